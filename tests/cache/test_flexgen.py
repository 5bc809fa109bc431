"""FlexGen: group-wise 4-bit KV quantization (golden values, exact bytes), the compressed inference cache
equals the quantized training forward, sparse attention in both, placement with compression."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.quant import bytes_per_vector, fake_quantize, group_dequantize, group_quantize
from pikv_train.errors import ConfigError, RollbackError
from pikv_train.models import Decoder, ModelConfig, generate

T = 24
pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_quantize_golden_values_and_packing():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, -1.0, -1.0]])
    qt = group_quantize(x, bits=4, group_size=4)
    # min 0, max 3: scale 15/3 = 5, codes 0, 5, 10, 15 packed high/low nibble: 0x05, 0xAF.
    assert qt.codes.tolist() == [[0x05, 0xAF], [0x00, 0x00]]
    assert qt.mn.flatten().tolist() == [0.0, -1.0]
    torch.testing.assert_close(group_dequantize(qt), x)  # exact grid values come back exactly (constant row too)
    # Zero padding up to the group: 3 values in a group of 4, the pad 0 enters min/max as in FlexGen.
    qt = group_quantize(torch.tensor([1.0, 2.0, 3.0]), bits=4, group_size=4)
    assert float(qt.mn) == 0.0 and qt.codes.numel() == 2 and group_dequantize(qt).shape == (3,)
    assert bytes_per_vector(24, 4, 64, 4) == 32 + 8 and bytes_per_vector(128, 4, 64, 2) == 64 + 8


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_error_is_bounded_by_half_a_step(bits):
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    qt = group_quantize(x, bits, 64)
    err = (group_dequantize(qt) - x).abs().view(3, 5, 2, 64)
    step = 1 / qt.scale  # (3, 5, 2, 1)
    assert (err <= step / 2 + 1e-6).all() and (err > 0).any()
    assert qt.nbytes() == 3 * 5 * bytes_per_vector(128, bits, 64, 4)


def test_fake_quantize_has_a_straight_through_gradient():
    x = torch.randn(4, 64, requires_grad=True)
    y = fake_quantize(x)
    assert not torch.equal(y, x)
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * y.detach())  # d/dx of y^2 with dy/dx = 1


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", n_head=4, n_kv_head=2)
    model = Decoder(cfg)
    pol = build_policy(CacheConfig(policy="flexgen", **kw), cfg)
    model.set_cache_policy(pol)
    return model.eval(), pol


@pytest.mark.parametrize("kw", [dict(kv_bits=4, kv_group_size=8), dict(attn_sparsity=0.5),
                                dict(kv_bits=4, kv_group_size=16, attn_sparsity=0.3), dict(kv_bits=8)])
def test_compressed_sparse_cache_decoding_equals_training_forward(kw):
    model, pol = _model(budget=8, **kw)
    x = torch.randint(0, 258, (2, T))
    full = model.logits(model(x).hidden)
    for prefill in (1, 9):
        dec = decode_tokenwise(model, pol.new_cache(model.cfg.n_layer), x, prefill)
        torch.testing.assert_close(dec, full, atol=1e-4, rtol=1e-4)
    model.set_cache_policy(None)
    dense = model.logits(model(x).hidden)
    assert (dense - full).abs().max() > 1e-5  # quantization / sparsity really changes the output
    torch.testing.assert_close(dense[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)  # row 0 reads its exact own key


def test_compressed_cache_stores_codes_and_scales_exactly():
    model, pol = _model(budget=10, kv_bits=4, kv_group_size=8)
    cache = pol.new_cache(model.cfg.n_layer)
    decode_tokenwise(model, cache, torch.randint(0, 258, (2, T)), 5)
    cfg = model.cfg  # head_dim 8: one group -> 4 bytes of codes + fp32 min and scale = 12 bytes (vs 32 raw)
    per_vec = bytes_per_vector(cfg.head_dim, 4, 8, 4)
    assert cfg.head_dim == 8 and per_vec == 12
    per_token = cfg.n_layer * 2 * cfg.n_kv_head * 2 * per_vec  # layers x batch x kv-heads x (k, v)
    assert cache.bytes_on_device() == 10 * per_token
    assert cache.bytes_on_host() == (T - 10) * per_token
    assert all(p["k"].codes.dtype == torch.uint8 for p in cache.device_part)
    # The training forward reports the same figure (summed over layers, per sequence).
    stats = model.train()(torch.randint(0, 258, (2, T))).stats
    assert float(stats["cache/bytes_stored"]) == T * cfg.n_layer * cfg.n_kv_head * 2 * per_vec


def test_training_forward_with_quantized_kv_backpropagates():
    model, pol = _model(budget=8, kv_bits=4, kv_group_size=8, attn_sparsity=0.5)
    model.train()
    x = torch.randint(0, 258, (2, T))
    model.logits(model(x).hidden).logsumexp(-1).mean().backward()
    g = model.blocks[0].attn.kv_proj.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_generate_with_compressed_cache_and_padding():
    model, pol = _model(budget=6, kv_bits=4, kv_group_size=8, attn_sparsity=0.5)
    prompts = [torch.randint(0, 258, (n,)) for n in (4, 9)]
    one = generate(model, [prompts[0]], 12, temperature=0, cache_factory=pol.new_cache)
    two = generate(model, prompts, 12, temperature=0, cache_factory=pol.new_cache)
    assert torch.equal(one.tokens[0, -12:], two.tokens[0, -12:])  # left padding does not leak


def test_flexattention_path_with_compression_equals_sdpa_path():
    model, pol = _model(budget=8, kv_bits=4, kv_group_size=8)
    x = torch.randint(0, 258, (1, 32))
    ref = model(x).hidden
    pol.use_flex = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(x).hidden
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,word", [(dict(kv_bits=3), "kv_bits"), (dict(kv_bits=4, kv_group_size=5), "even"),
                                     (dict(attn_sparsity=0.0), "attn_sparsity"), (dict(attn_sparsity=1.5), "attn_sparsity"),
                                     (dict(sparse_top_k=8), "replaced by cache.attn_sparsity")])
def test_bad_flexgen_settings_are_one_line_errors(kw, word):
    with pytest.raises(ConfigError, match=word) as e:
        CacheConfig(policy="flexgen", **kw).validate()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_groups_and_half_precision(dtype):
    qt = group_quantize(torch.full((2, 64), 3.0, dtype=dtype), 4, 64)
    assert torch.isfinite(qt.scale).all() and (qt.codes == 0).all()
    assert torch.equal(group_dequantize(qt), torch.full((2, 64), 3.0, dtype=dtype))
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    qt = group_quantize(x, 4, 64)
    assert qt.mn.dtype == dtype and group_dequantize(qt).dtype == dtype
    err = (group_dequantize(qt).float() - x.float()).abs().view(8, 2, 64)
    step = 1 / qt.scale.float()
    tol = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]  # output rounding to dtype
    assert (err <= step / 2 + tol * x.float().abs().max()).all()


def test_sparse_keep_count_matches_flexgen_integer_rounding():
    from pikv_train.cache.policies.flexgen import sparse_attention

    n = 90  # past keys: 0.7 * 90 is 62.999... in doubles (FlexGen keeps int() = 62) but 63.0 in fp32
    q, k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, n + 1, 4), torch.ones(1, 1, n + 1, 1)
    vis = torch.ones(1, 1, 1, n + 1, dtype=torch.bool)
    own = torch.zeros_like(vis)
    own[..., -1] = True
    out = sparse_attention(q, k, v, vis, own, 0.7)  # sum of the kept weights
    p = (q @ k.transpose(-1, -2) / 2).softmax(-1)[0, 0, 0]
    kept = p[:-1].sort(descending=True).values[: int(0.7 * n)].sum() + p[-1]
    torch.testing.assert_close(out.flatten(), kept.reshape(1), rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compressed_training_forward_matches_cpu():
    model, pol = _model(budget=8, kv_bits=4, kv_group_size=8)
    model.train()
    x = torch.randint(0, 258, (2, 64))
    ref = model(x).hidden
    model.cuda()
    out = model(x.cuda())  # FlexAttention over [Q(k) ; k] with a non-causal mask_mod
    out.hidden.sum().backward()
    torch.testing.assert_close(out.hidden.cpu(), ref, atol=2e-4, rtol=2e-4)


VERSIONED = {  # small groups / residual / tiers so that every stored form appears within T tokens
    "quantized": dict(name="quantized", bits=2, group_size=4, residual=8),
    "pyramid": dict(name="pyramid", group_size=4, recent=4, tier_every=4, byte_budget=0.8),
}


def _peaky(model):
    with torch.no_grad():  # large q/k: most rows put most of their mass on one key (the sparse top-k matters)
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(20.0)
            blk.attn.kv_proj.weight[: model.cfg.n_kv_head * model.cfg.head_dim].mul_(20.0)
    return model


@pytest.mark.parametrize("comp", VERSIONED)
@pytest.mark.parametrize("sparsity", [0.5, 1.0])
def test_flexgen_places_versioned_stores_and_decodes_as_it_trained(comp, sparsity):
    """KIVI / MiKV under FlexGen: decoding equals the training forward; the rows of tokens older than the budget
    live on the host; the bytes are those of the same stores without placement (placement moves, never adds)."""
    model, pol = _model(budget=8, attn_sparsity=sparsity, compressor=VERSIONED[comp])
    _peaky(model)
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        train = model.logits(model(x).hidden)
        cache = pol.new_cache(model.cfg.n_layer)
        dec = decode_tokenwise(model, cache, x, 5)
        full_pol = build_policy(CacheConfig(compressor=VERSIONED[comp]), model.cfg)  # policy full, same stores
        ref = full_pol.new_cache(model.cfg.n_layer)
        model.set_cache_policy(full_pol)
        dense = decode_tokenwise(model, ref, x, 5)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    if sparsity < 1:  # FlexGen's sparse values really act on the tiered / quantized keys
        assert float((dense - train).abs().max()) > 1e-3 * scale
    else:
        torch.testing.assert_close(dec, dense, rtol=1e-5, atol=1e-5 * scale)
    assert cache.bytes_stored() == ref.bytes_stored()
    from pikv_train.cache.policies.base import tensor_bytes

    states = [st for layer in cache.store for row in layer for st in row]
    host = sum(rows.numel() * rows.element_size() for st in states for _, _, rows in st["kv"]._host)
    device = sum(st["kv"].inner.nbytes() + tensor_bytes({n: x for n, x in st.items() if n != "kv"}) for st in states)
    assert cache.bytes_on_host() == host > 0 and cache.bytes_on_device() == device and host + device == ref.bytes_stored()
    for layer in cache.store:
        for row in layer:
            for st in row:
                placed, cut = st["kv"], st["pos"][-8]  # the oldest of the 8 most recent tokens
                host = {(id(h), n): len(rows) for h, n, rows in placed._host}
                assert all(str(rows.device) == "cpu" for _, _, rows in placed._host)
                dev = {(id(h), n): len(getattr(h, n)) for h, n, _ in placed._host}
                placed._join()  # every row back in one tensor: placed_rows gives each row's position
                n_key_rows = 0
                for h, n, p in placed.inner.placed_rows(st["pos"]):
                    assert host.get((id(h), n), 0) == int((p < cut).sum())  # the older rows were on the host
                    assert dev.get((id(h), n), len(p)) == int((p >= cut).sum())  # the device kept the recent ones
                    n_key_rows += host.get((id(h), n), 0) if n in ("k_codes", "k_res") else 0
                if comp == "quantized":
                    assert n_key_rows == T - 8  # every key older than the 8 most recent is on the host
    with pytest.raises(RollbackError, match="snapshot"):
        cache.rollback(torch.tensor([T - 3, T - 3]))


@pytest.mark.parametrize("comp", VERSIONED)
def test_sparse_attention_over_stored_forms_keeping_everything_is_the_versioned_attention(comp):
    """sparse_attention_versions with sparsity 1 keeps every weight: it must equal the versioned SDPA (the
    per-(row, key) stored forms are combined right, for KIVI's blocks and MiKV's per-pair tiers alike)."""
    from pikv_train.cache.compression import build_compressor
    from pikv_train.cache.compression.config import CompressorConfig
    from pikv_train.cache.policies.flexgen import sparse_attention_versions
    from pikv_train.models.attention import attend

    cfg = ModelConfig.preset("nano", n_head=4, n_kv_head=2)
    comp_obj = build_compressor(CompressorConfig.from_any(VERSIONED[comp]), cfg)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, T, 8, generator=g) * 3 for h in (4, 2, 2))
    ver = comp_obj.versions(0, k, v, q=q) if comp == "pyramid" else comp_obj.versions(0, k, v)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    ref = attend(q, k, v, causal, 2, ver)
    torch.testing.assert_close(sparse_attention_versions(q, ver, causal, 1.0), ref, rtol=1e-5, atol=1e-5)
    assert float((sparse_attention_versions(q, ver, causal, 0.3) - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("comp", VERSIONED)
def test_flexgen_with_a_versioned_compressor_trains_and_generates_with_left_padding(comp):
    model, pol = _model(budget=6, attn_sparsity=0.5, compressor=VERSIONED[comp])
    model.train()
    model.logits(model(torch.randint(0, 258, (2, T))).hidden).logsumexp(-1).mean().backward()
    assert model.blocks[0].attn.kv_proj.weight.grad.abs().sum() > 0  # straight through the stored forms
    model.eval()
    prompts = [torch.randint(0, 258, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 9)]
    one = generate(model, [prompts[0]], 10, temperature=0, cache_factory=pol.new_cache)
    two = generate(model, prompts, 10, temperature=0, cache_factory=pol.new_cache)
    assert torch.equal(one.tokens[0, -10:], two.tokens[0, -10:])  # left padding does not leak
    # The logits too: the short prompt left-padded in a batch with the long one, against it alone.
    pad = torch.cat([torch.zeros(5, dtype=torch.long), prompts[0]])
    x = torch.stack([pad, prompts[1]])
    pos = torch.stack([torch.arange(9) - 5, torch.arange(9)]).clamp_min(-1)
    pos[0, :5] = -1
    with torch.no_grad():
        alone = decode_tokenwise(model, pol.new_cache(model.cfg.n_layer), prompts[0][None], 1)
        cache = pol.new_cache(model.cfg.n_layer)
        both = torch.cat([model.logits(model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache).hidden)
                          for i in range(9)], 1)
    torch.testing.assert_close(both[0, 5:], alone[0], rtol=1e-4, atol=1e-4 * float(alone.abs().max()))


@pytest.mark.parametrize("comp", VERSIONED)
def test_flexgen_versioned_cache_snapshot_and_restore(comp):
    """The rollback error points at snapshot/restore: restoring gives back the stores, their host rows included."""
    model, pol = _model(budget=6, attn_sparsity=0.5, compressor=VERSIONED[comp])
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = pol.new_cache(model.cfg.n_layer)
        decode_tokenwise(model, cache, x[:, :16], 16)  # a 16-token prompt (fed row by row)
        snap, n_bytes = cache.snapshot(), cache.bytes_stored()
        pos = torch.arange(T).expand(2, -1)
        first = [model.logits(model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache).hidden) for i in (16, 17)]
        cache.restore(snap)
        assert cache.bytes_stored() == n_bytes
        again = [model.logits(model(x[:, i: i + 1], positions=pos[:, i: i + 1], cache=cache).hidden) for i in (16, 17)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
