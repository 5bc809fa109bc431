"""Decoder, MoE dispatch and generation: equal outputs, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pikv_train.cache import KVCache
from pikv_train.errors import ConfigError
from pikv_train.models import Decoder, ModelConfig, MoEConfig, generate
from pikv_train.models.generation import left_pad, sample_next
from pikv_train.routing import RouterConfig

from helpers import assert_close_rel


def _models():
    yield "dense", Decoder(ModelConfig.preset("nano")).eval()
    yield "moe", Decoder(ModelConfig.preset("nano-moe")).eval()
    cfg = ModelConfig.preset("nano-moe")
    cfg.moe.shared_expert = True
    yield "moe-shared", Decoder(cfg).eval()


@pytest.mark.parametrize("name,model", list(_models()))
def test_cached_decoding_equals_full_forward(name, model):
    x = torch.randint(0, 258, (3, 24))
    full = model.logits(model(x).hidden)  # (B, T, V)
    cache = KVCache(model.cfg.n_layer)
    pos = torch.arange(24).expand(3, 24)
    outs = [model.logits(model(x[:, :7], positions=pos[:, :7], cache=cache).hidden)]  # prefill 7 tokens
    for t in range(7, 24):
        outs.append(model.logits(model(x[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache).hidden))
    assert_close_rel(torch.cat(outs, 1), full, 1e-5)
    assert len(cache) == 24


def test_left_padded_batch_matches_each_prompt_alone():
    torch.manual_seed(1)
    model = Decoder(ModelConfig.preset("nano-moe")).eval()
    prompts = [torch.randint(0, 256, (n,)) for n in (5, 9, 2)]
    ids, pos = left_pad(prompts, pad_id=257)
    batched = model.logits(model(ids, positions=pos, cache=KVCache(2)).hidden[:, -1])  # (B, V)
    for i, p in enumerate(prompts):
        alone = model.logits(model(p[None]).hidden[:, -1])
        assert_close_rel(batched[i], alone[0], 1e-5)


def test_greedy_generation_equals_argmax_of_full_forward():
    model = Decoder(ModelConfig.preset("nano-moe")).eval()
    prompts = [torch.randint(0, 256, (n,)) for n in (4, 6)]
    gen = generate(model, prompts, 10, temperature=0.0, pad_id=257)
    assert gen.tokens.shape == (2, 6 + 10)
    for i, p in enumerate(prompts):
        seq = p.clone()
        for _ in range(10):
            seq = torch.cat([seq, model.logits(model(seq[None]).hidden)[0, -1].argmax()[None]])
        assert torch.equal(gen.tokens[i, -10:], seq[-10:])
    assert gen.lengths.tolist() == [10, 10]


def test_generation_stops_rows_at_eos():
    model = Decoder(ModelConfig.preset("nano")).eval()
    model.logits = lambda h: F.one_hot(torch.full(h.shape[:-1], 256), 258).float()  # EOS is always the argmax
    gen = generate(model, [torch.tensor([1, 2, 3])], 5, temperature=0.0, eos_id=256, pad_id=257)
    assert gen.tokens[0, 3].item() == 256 and gen.lengths.tolist() == [1]


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p=0.7: p = softmax -> [0.64, 0.24, 0.09, 0.03]; keep tokens until the mass reaches 0.7 -> {0, 1}
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, temperature=0.0).tolist()) == {0}


def test_moe_matches_per_token_reference():
    torch.manual_seed(0)
    model = Decoder(ModelConfig.preset("nano-moe"))
    moe = model.blocks[0].ffn
    x = torch.randn(2, 5, 32)
    y, r = moe(x)
    xf = x.reshape(10, 32)
    ref = torch.zeros_like(xf)
    for t in range(10):
        for slot in range(r.ids.shape[1]):
            if r.valid[t, slot]:
                ref[t] += r.weights[t, slot] * moe.experts[int(r.ids[t, slot])](xf[t : t + 1])[0]
    assert_close_rel(y.reshape(10, 32), ref, 1e-5)  # |y| ~ 1e-3: an absolute 1e-6 meant 1e-3 relative


def test_every_expert_gets_a_gradient_even_when_unused():
    cfg = ModelConfig.preset("nano-moe")
    model = Decoder(cfg)
    router = model.blocks[0].ffn.router

    def only_first_two(logits, x):  # every token goes to experts 0 and 1; experts 2, 3 get no rows
        probs = logits.softmax(-1)
        ids = torch.tensor([0, 1]).expand(logits.shape[0], 2)
        return ids, torch.ones_like(ids, dtype=torch.bool), probs.gather(1, ids), probs

    router.select = only_first_two
    x = torch.randint(0, 258, (2, 8))
    out = model(x)
    (model.logits(out.hidden).sum() + out.router_loss).backward()
    for e in model.blocks[0].ffn.experts:
        for p in e.parameters():
            assert p.grad is not None  # DDP needs a (possibly zero) gradient for every parameter


def test_router_top_k_above_experts_is_refused():
    with pytest.raises(ConfigError, match="top_k=5 exceeds n_experts=4"):
        ModelConfig(moe=MoEConfig(n_experts=4, router=RouterConfig(top_k=5)))


def test_sequence_longer_than_positions_is_refused():
    model = Decoder(ModelConfig.preset("nano"))
    with pytest.raises(ConfigError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_lm_head_is_tied_and_logits_shape():
    model = Decoder(ModelConfig.preset("nano"))
    assert model.head_weight is model.embed.weight
    out = model(torch.zeros(2, 3, dtype=torch.long))
    assert model.logits(out.hidden).shape == (2, 3, 258)
    assert F.softmax(model.logits(out.hidden), -1).sum(-1).allclose(torch.ones(2, 3))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Decoder(ModelConfig.preset("nano-moe"))
    x = torch.randint(0, 258, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        out = model(x)
        (model.logits(out.hidden).logsumexp(-1).mean() + out.router_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert_close_rel(grads[1][n], grads[0][n], 1e-5)
