"""Hugging Face causal LMs answer our decoder's causal-LM interface: logits equal the model's own for families
that transform them after the LM head (Gemma-2 soft cap, Cohere scale, Phi bias), the chunked loss with their
head equals the dense loss, a family whose transform is not reproduced is refused at load, and decoding
through the cache (left padding, rollback, snapshot/restore) equals running each row without a cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from pikv_train.distill import chunked_distill_loss, forward_kl
from pikv_train.errors import ConfigError, RollbackError
from pikv_train.models import hf_causal_lm
from pikv_train.models.head import LogitHead
from pikv_train.models.hf_causal_lm import HFCausalLM

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

V, REAL_V = 64, 60  # LM-head rows (padded) and tokenizer size
TOL = 1e-5
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=1)


def _configs() -> dict:
    return {
        "llama": transformers.LlamaConfig(**COMMON),
        "qwen2": transformers.Qwen2Config(**COMMON),
        # A small cap, and an LM head large enough that the cap bends the logits (checked below).
        "gemma2": transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0, sliding_window=32),
        # Sliding window shorter than the sequences: rollback must crop across it.
        "gemma2_swa": transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0, sliding_window=4),
        "cohere": transformers.CohereConfig(**COMMON, logit_scale=0.25),
        "phi": transformers.PhiConfig(**COMMON),  # lm_head has a bias
    }


def _tokenizer():
    vocab = {f"t{i}": i for i in range(REAL_V)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """family -> a saved tiny random model folder (built once per module). Tiny tensors: one intra-op thread,
    as more only add contention on a shared machine."""
    made: dict[str, str] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(name: str) -> str:
        if name not in made:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_configs()[name])
            head = model.get_output_embeddings()
            with torch.no_grad():  # random init gives |logits| << 1: make the transforms matter
                head.weight.normal_(0.0, 1.0)
                if head.bias is not None:
                    head.bias.normal_(0.0, 1.0)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            _tokenizer().save_pretrained(path)
            made[name] = str(path)
        return made[name]

    yield make
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wrapped(folder):
    """family -> HFCausalLM (loaded once per module)."""
    loaded: dict[str, HFCausalLM] = {}

    def load(name: str) -> HFCausalLM:
        if name not in loaded:
            loaded[name] = HFCausalLM(folder(name))
        return loaded[name]

    return load


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, REAL_V, (b, t), generator=torch.Generator().manual_seed(seed))


# --- the head -----------------------------------------------------------------------------------------------

def test_logit_head_math_slicing_and_validation():
    g = torch.Generator().manual_seed(0)
    w, b, h = torch.randn(7, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, 5, 3, generator=g)
    head = LogitHead(w, b, scale=0.5, softcap=1.5)
    expected = 1.5 * torch.tanh((h @ w.t() + b) * 0.5 / 1.5)
    assert_close_rel(head(h), expected, TOL)
    assert_close_rel(head(h, 4), expected[..., :4], TOL)
    assert head.to(torch.float64)(h.double()).dtype == torch.float64 and head.vocab_size == 7
    for bad in (dict(weight=w[0]), dict(weight=w, bias=b[:3]), dict(weight=w, softcap=0.0), dict(weight=w, scale=0.0)):
        with pytest.raises(ValueError, match="LogitHead"):
            LogitHead(**bad)


def test_decoder_head_is_its_plain_projection():
    from pikv_train.models import Decoder, ModelConfig

    model = Decoder(ModelConfig.preset("nano-moe", vocab_size=50))
    h = torch.randn(2, 3, model.cfg.d_model)
    assert model.head.weight is model.head_weight
    assert_close_rel(model.head(h), model.logits(h), TOL)


# --- logits equal the model's own ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere", "phi"])
def test_logits_equal_the_models_own(wrapped, name):
    w = wrapped(name)
    ids = _ids(2, 7)
    with torch.no_grad():
        ref = w.model(ids).logits  # (2, 7, V)
        hidden = w(ids).hidden
        got = w.logits(hidden)
        plain = F.linear(hidden, w.head_weight)  # the head without the family's transform
    assert got.shape == ref.shape == (2, 7, V)
    assert_close_rel(got, ref, TOL)
    if name != "llama":  # the transform is visible: a plain projection would be far off
        assert float((plain - ref).abs().max()) > 0.1 * float(ref.abs().max())
    if name == "gemma2":
        assert float(plain.abs().max()) > 3 * w.head.softcap  # the cap bends the logits


@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere", "phi"])
def test_chunked_loss_with_the_teacher_head_equals_the_dense_loss(wrapped, name):
    w = wrapped(name)
    ids = _ids(2, 7, seed=1)
    g = torch.Generator().manual_seed(2)
    s_hidden = torch.randn(14, 6, generator=g, requires_grad=True)
    s_weight = torch.randn(REAL_V, 6, generator=g)
    with torch.no_grad():
        t_hidden = w(ids).hidden.flatten(0, 1)  # (14, d)
        t_logits = w.model(ids).logits.flatten(0, 1)[:, :REAL_V]  # (14, REAL_V)
    loss = chunked_distill_loss(s_hidden, s_weight, t_hidden, teacher_head=w.head, vocab_size=REAL_V, chunk_size=4)
    ref = forward_kl(student_logits=s_hidden @ s_weight.t(), teacher_logits=t_logits)
    assert_close_rel(loss, ref, TOL)
    (g_loss,), (g_ref,) = torch.autograd.grad(loss, s_hidden), torch.autograd.grad(ref, s_hidden)
    assert_close_rel(g_loss, g_ref, TOL)


@pytest.mark.parametrize("name", ["gemma2", "cohere", "phi"])
def test_a_family_whose_logit_transform_is_not_reproduced_is_refused(folder, monkeypatch, name):
    path = folder(name)
    if name == "phi":  # forget the bias
        monkeypatch.setattr(HFCausalLM, "head", property(lambda self: LogitHead(self.head_weight)))
    else:  # forget the scale / soft cap
        monkeypatch.setattr(hf_causal_lm, "logit_transform", lambda config: (1.0, None))
    with pytest.raises(ConfigError, match=f"'{name}' models transform their logits in a way pikv_train does not"):
        HFCausalLM(path)


# --- the KV cache -------------------------------------------------------------------------------------------

PROMPT_LENS = [3, 6, 4]


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids left-padded with id 1 and (B, P) positions, -1 on padding."""
    p = max(len(r) for r in rows)
    ids = torch.ones(len(rows), p, dtype=torch.long)
    pos = torch.full((len(rows), p), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, p - len(r):] = r
        pos[i, p - len(r):] = torch.arange(len(r))
    return ids, pos


def _reference(w: HFCausalLM, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per row, (len, V) logits of the unpadded sequence run without a cache."""
    with torch.no_grad():
        return [w.logits(w(r[None]).hidden)[0] for r in rows]


def _prefill(w: HFCausalLM, seed: int = 0):
    prompts = [_ids(1, n, seed=seed + i)[0] for i, n in enumerate(PROMPT_LENS)]
    ids, pos = _left_pad(prompts)
    cache = w.new_cache()
    with torch.no_grad():
        last = w.logits(w(ids, positions=pos, cache=cache).hidden[:, -1])  # (B, V)
    return prompts, cache, last, torch.tensor(PROMPT_LENS)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_cached_decoding_of_a_left_padded_batch_equals_cache_free(wrapped, name):
    w = wrapped(name)
    prompts, cache, last, lens = _prefill(w)
    steps = _ids(3, 4, seed=9)  # teacher-forced continuation
    refs = _reference(w, [torch.cat([p, s]) for p, s in zip(prompts, steps)])
    assert_close_rel(last, torch.stack([r[n - 1] for r, n in zip(refs, PROMPT_LENS)]), 1e-4)
    for j in range(steps.shape[1]):
        with torch.no_grad():
            got = w.logits(w(steps[:, j: j + 1], positions=(lens + j)[:, None], cache=cache).hidden[:, -1])
        assert_close_rel(got, torch.stack([r[n + j] for r, n in zip(refs, PROMPT_LENS)]), 1e-4)
    assert len(cache) == max(PROMPT_LENS) + steps.shape[1]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rollback_per_row_then_refeed_equals_cache_free_and_crops(wrapped, name):
    w = wrapped(name)
    prompts, cache, _, lens = _prefill(w)
    p = len(cache)
    block = _ids(3, 4, seed=5)
    with torch.no_grad():
        w(block, positions=lens[:, None] + torch.arange(4), cache=cache)
    full = cache.bytes_stored()
    # Round 1: every row drops at least its last block token, so that column is cropped.
    n_keep = torch.tensor([1, 3, 0])
    cache.rollback(lens - 1 + n_keep)
    assert len(cache) == p + 3 and cache.kv.layers[0].keys.shape[-2] == p + 3
    assert cache.bytes_stored() == full * (p + 3) // (p + 4)
    new = _ids(3, 3, seed=6)
    with torch.no_grad():
        got = w.logits(w(new, positions=(lens + n_keep)[:, None] + torch.arange(3), cache=cache).hidden)  # (B, 3, V)
    kept = [torch.cat([pr, block[i, : int(n_keep[i])], new[i]]) for i, pr in enumerate(prompts)]
    refs = _reference(w, kept)
    expect = torch.stack([r[-3:] for r in refs])
    assert_close_rel(got, expect, 1e-4)
    # Round 2: row 1 keeps everything, so nothing is cropped; the others hide their last token.
    lens2 = lens + n_keep + 3
    before = len(cache)
    cache.rollback(lens2 - 1 - torch.tensor([1, 0, 2]))
    assert len(cache) == before
    nxt = _ids(3, 1, seed=7)
    with torch.no_grad():
        got = w.logits(w(nxt, positions=(lens2 - torch.tensor([1, 0, 2]))[:, None], cache=cache).hidden[:, -1])
    kept2 = [torch.cat([k[: len(k) - d], nxt[i]]) for i, (k, d) in enumerate(zip(kept, [1, 0, 2]))]
    assert_close_rel(got, torch.stack([r[-1] for r in _reference(w, kept2)]), 1e-4)


def test_rollback_crops_sliding_window_layers_past_the_window(wrapped):
    # transformers' own sliding layers refuse to crop once the window is full; ours keep every column.
    w = wrapped("gemma2_swa")
    seq = _ids(1, 9, seed=3)
    cache = w.new_cache()
    with torch.no_grad():
        w(seq[:, :5], cache=cache)
        for j in range(5, 9):
            w(seq[:, j: j + 1], cache=cache)  # positions continue from the cache
        cache.rollback(torch.tensor([5]))  # keep positions 0..5
        assert len(cache) == 6
        new = _ids(1, 2, seed=4)
        got = w.logits(w(new, cache=cache).hidden)
    ref = _reference(w, [torch.cat([seq[0, :6], new[0]])])[0][-2:]
    assert_close_rel(got[0], ref, 1e-4)


def test_recurrent_cache_layers_are_refused():
    config = transformers.Qwen3NextConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=V)
    with pytest.raises(ConfigError, match="LinearAttentionLayer cache layers, which cannot be rolled back"):
        hf_causal_lm.HFKVCache(config)


def test_snapshot_restore_round_trip_and_restore_only_goes_backwards(wrapped):
    w = wrapped("llama")
    _, cache, _, lens = _prefill(w)
    p = len(cache)
    snap = cache.snapshot()
    block = _ids(3, 3, seed=8)
    with torch.no_grad():
        first = w(block, cache=cache).hidden  # positions continue each row: lens + 0..2
        # Row 0 also hides its last prompt token (a column from before the snapshot); no column is cropped.
        cache.rollback(torch.tensor([int(lens[0]) - 2, 99, 99]))
        assert len(cache) == p + 3
        cache.restore(snap)
        assert len(cache) == p and torch.equal(cache.mask, snap["mask"])
        assert torch.equal(cache.positions, snap["positions"])
        again = w(block, positions=lens[:, None] + torch.arange(3), cache=cache).hidden
    assert_close_rel(again, first, 1e-6)
    # A rollback that crops below a later snapshot's columns invalidates it; the earlier snapshot still works.
    late = cache.snapshot()
    cache.rollback(lens - 1)
    assert len(cache) == p
    with torch.no_grad():
        w(block, cache=cache)
    with pytest.raises(RollbackError, match="restore only goes backwards"):
        cache.restore(late)
    cache.restore(snap)
    assert len(cache) == p
