"""KV storage compressors (SPEC §6): what each stores, its bytes, its training transform, its trainable parts.

The train == deploy equality of every compressor under every policy is in tests/cache/test_contract.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.compression import CompressorConfig, QuantizedCompressor
from pikv_train.cache.compression.kivi import KIVIStore
from pikv_train.cache.quant import group_dequantize, group_quantize
from pikv_train.errors import ConfigError
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.layers import apply_rotary

pytestmark = pytest.mark.usefixtures("one_thread")  # token-by-token decoding: many tiny ops
T = 40
SETTINGS = {
    "quantized": dict(name="quantized", bits=2, group_size=4, residual=8),
    "quantized4": dict(name="quantized", bits=4, group_size=8, residual=16),
    "svd": dict(name="svd", rank=0.25),
    "lora": dict(name="lora", rank=0.5),
    "lora_plus": dict(name="lora_plus", rank=3),
    "pruning": dict(name="pruning", keep_channels=0.5),
}


def _model(comp: dict, policy: str = "full", **cache) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=64, max_seq_len=64)
    model = Decoder(cfg)
    model.set_cache_policy(build_policy(CacheConfig(policy=policy, compressor=comp, **cache), cfg))
    if comp.get("name") == "pruning":
        model.cache_policy.compressor.calibrate(model, torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(5)))
    return model.eval()


def _ids(seed=1, b=2, t=T):
    return torch.randint(0, 258, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_cache_holds_the_compressed_form_and_counts_its_bytes(name):
    """bytes_stored() equals the tensors really held, which have the compressed shapes, and the closed form."""
    model = _model(SETTINGS[name])
    comp = model.cache_policy.compressor
    cfg, hd = model.cfg, model.cfg.head_dim
    cache = model.new_cache()
    with torch.no_grad():
        decode_tokenwise(model, cache, _ids(), 5)
    held, pos_bytes = 0, 0
    for layer in cache.store:
        for row in layer:
            for st in row:
                store = st["kv"]
                pos_bytes += st["pos"].numel() * 8
                assert len(st["pos"]) == T
                if name.startswith("quantized"):
                    b = comp.cfg.bits
                    assert store.k_codes.dtype == torch.uint8 and store.k_codes.shape[1] == hd * b // 8
                    assert store.v_codes.dtype == torch.uint8
                    assert len(store.k_codes) == comp.cfg.residual * ((T - 1) // comp.cfg.residual)
                    assert len(store.v_full) == comp.cfg.residual + 1  # the newest R + 1 values full precision
                    fields = ("k_codes", "g_id", "g_mn", "g_scale", "o_id", "o_mn", "o_mx", "k_res", "v_codes",
                              "v_mn", "v_scale", "v_full")
                    held += sum(getattr(store, f).numel() * getattr(store, f).element_size() for f in fields)
                else:
                    width = {"svd": comp.__dict__.get("rank"), "lora": comp.__dict__.get("rank"),
                             "lora_plus": 3, "pruning": hd // 2}[name]
                    assert store.codes["k"].shape == (T, width)  # latents / kept channels, not head_dim
                    assert store.codes["v"].shape == (T, hd if name == "pruning" else width)
                    held += sum(c.numel() * c.element_size() for c in store.codes.values())
    assert cache.bytes_stored() == held + pos_bytes
    heads = cfg.n_layer * 2 * cfg.n_kv_head  # layers x batch x kv-heads
    assert held == pytest.approx(heads * T * comp.bytes_per_token_head(4, T), rel=1e-9)
    assert comp.bytes_per_token_head(4, T) < 2 * hd * 4  # fewer bytes than the fp32 key + value


def test_kivi_2bit_meets_its_ratio_at_a_long_context():
    """The issue's target: 2-bit KIVI <= 0.16 x the fp32 cache per token at 2,048 tokens (head_dim 24 as the
    demo student; residual 32 amortised), counting scales, residual and open groups."""
    cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=96, d_ff=64)
    comp = QuantizedCompressor(CompressorConfig(name="quantized", bits=2, group_size=32, residual=32), cfg)
    assert comp.bytes_per_token_head(4, 2048) / (2 * 24 * 4) <= 0.16


def test_kivi_store_quantizes_keys_per_channel_and_values_per_token_on_schedule():
    """One stream fed token by token: query t reads keys j < R*floor(t/R) quantized per channel over groups of
    G tokens, values j with t - j > R quantized per token, everything else exact (KIVI's residual)."""
    g, r, hd = 4, 8, 8
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=16)
    comp = QuantizedCompressor(CompressorConfig(name="quantized", bits=2, group_size=g, residual=r), cfg)
    k, v = torch.randn(30, hd), torch.randn(30, hd)
    kq = group_dequantize(group_quantize(k.t(), 2, g)).t()[:30]  # per channel, groups of G tokens
    vq = group_dequantize(group_quantize(v, 2, g))  # per token, groups of G channels
    store, pos = KIVIStore(comp, k), torch.zeros(0, dtype=torch.long)
    for t in range(30):
        if t:
            rk, rv = store.read(t, pos)
            cut = r * (t // r)
            torch.testing.assert_close(rk[:cut], kq[:cut], rtol=0, atol=0)
            torch.testing.assert_close(rk[cut:], k[cut:t], rtol=0, atol=0)
            old = max(0, t - r)
            torch.testing.assert_close(rv[:old], vq[:old], rtol=0, atol=0)
            torch.testing.assert_close(rv[old:], v[old:t], rtol=0, atol=0)
        pos = torch.arange(t + 1)
        store.commit({"k": k[t:t + 1], "v": v[t:t + 1]}, pos, torch.ones(t + 1, dtype=torch.bool))


def test_kivi_group_scales_cover_keys_evicted_before_the_group_was_quantized():
    """With an evicting policy a key may leave before its group fills: the group's min/max still covers it
    (the running statistics), as the training forward's group quantization does."""
    g, r, hd = 4, 4, 8
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=16)
    comp = QuantizedCompressor(CompressorConfig(name="quantized", bits=2, group_size=g, residual=r), cfg)
    k, v = torch.randn(9, hd), torch.randn(9, hd)
    k[1] = 50.0  # an extreme key, evicted before group 0 is quantized
    kq = group_dequantize(group_quantize(k.t(), 2, g)).t()[:9]
    store, pos = KIVIStore(comp, k), torch.zeros(0, dtype=torch.long)
    for t in range(9):
        if t:
            store.read(t, pos)
        p_all = torch.cat([pos, torch.tensor([t])])
        keep = p_all != 1
        store.commit({"k": k[t:t + 1], "v": v[t:t + 1]}, p_all, keep)
        pos = p_all[keep]
    rk, _ = store.read(8, pos)
    torch.testing.assert_close(rk[:3], kq[[0, 2, 3]], rtol=0, atol=0)  # scales of the full group 0 (key 1 in it)
    assert len(store.g_id) == 2 and not torch.allclose(rk[:3], k[[0, 2, 3]], atol=1e-3)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_compressed_training_forward_is_causal(name):
    model = _model(SETTINGS[name])
    x = _ids()
    y = x.clone()
    y[:, 30:] = (y[:, 30:] + 7) % 258
    with torch.no_grad():
        a, b = model(x).hidden, model(y).hidden
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert float((a[:, 30:] - b[:, 30:]).abs().max()) > 1e-3


def test_kivi_trains_through_a_straight_through_estimator():
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=16)
    comp = QuantizedCompressor(CompressorConfig(name="quantized", bits=2, group_size=4, residual=4), cfg)
    k, v = torch.randn(1, 1, 12, 8, requires_grad=True), torch.randn(1, 1, 12, 8, requires_grad=True)
    ver = comp.versions(0, k, v)
    assert not torch.equal(ver.keys[0].detach(), k.detach())  # really rounded
    (ver.keys[0] * 3).sum().backward()
    torch.testing.assert_close(k.grad, torch.full_like(k, 3.0))  # d round(k) / dk := 1


def test_svd_keys_are_palu_rank_r_reconstructions_with_rope_after():
    model = _model(SETTINGS["svd"])
    comp, attn = model.cache_policy.compressor, model.blocks[0].attn
    x = torch.randn(2, 10, 64)
    cos, sin = model.rotary(torch.arange(10).expand(2, 10))
    k, v, codes = comp.kv(0, attn, x, cos, sin)
    hd, r = model.cfg.head_dim, comp.rank
    wk = attn.kv_proj.weight[: 2 * hd].view(2, hd, 64)
    u, s, vh = torch.linalg.svd(wk)
    best = u[..., :r] @ torch.diag_embed(s[..., :r]) @ vh[:, :r]  # Eckart-Young optimum of rank r
    expect = apply_rotary(torch.einsum("btd,hed->bhte", x, best), cos, sin)
    torch.testing.assert_close(k, expect, rtol=1e-4, atol=1e-5)
    assert codes["k"].shape == (2, 2, 10, r)


def test_lora_starts_at_the_svd_truncation_then_trains_its_own_factors():
    from pikv_train.tasks.base import OptimConfig, build_optimizer

    svd, lora = _model(dict(name="svd", rank=0.5)), _model(dict(name="lora", rank=0.5))
    x = _ids()
    torch.testing.assert_close(lora(x).hidden, svd(x).hidden, rtol=1e-4, atol=1e-4)
    lora.train()
    attn_w = lora.blocks[0].attn.kv_proj.weight
    assert not attn_w.requires_grad  # the latent replaces the K/V projection
    opt = build_optimizer(lora, OptimConfig(lr=1e-2, warmup_steps=0), 10)["optimizer"]
    comp = lora.cache_policy.compressor
    roles = {g.get("pikv_hook_params"): g for g in opt.param_groups}
    assert roles["compressor_down"]["params"] == [comp.down_k, comp.down_v]
    assert roles["compressor_up"]["params"] == [comp.up_k, comp.up_v]
    assert roles["compressor_up"]["lr"] == roles["compressor_down"]["lr"] == opt.param_groups[0]["lr"]
    before = (comp.up_k.detach().clone(), comp.down_v.detach().clone(), attn_w.detach().clone())
    lora(x).hidden.pow(2).mean().backward()
    opt.step()
    assert not torch.equal(comp.up_k, before[0]) and not torch.equal(comp.down_v, before[1])
    assert torch.equal(attn_w, before[2])


def test_lora_plus_trains_the_up_projections_at_lambda_times_the_learning_rate():
    from pikv_train.tasks.base import OptimConfig, build_optimizer

    model = _model(dict(name="lora_plus", rank=0.5, lora_plus_ratio=16))
    opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0), 10)["optimizer"]
    roles = {g.get("pikv_hook_params"): g for g in opt.param_groups}
    assert roles["compressor_up"]["lr"] == pytest.approx(16e-3) and roles["compressor_down"]["lr"] == pytest.approx(1e-3)


def test_think_keeps_the_channels_with_the_largest_query_key_norm_products():
    """ThinK's score ||Q[:, j]|| * ||K[:, j]|| (summed over the query heads of a kv-head) on the calibration
    batch picks the kept channels; keys are stored with those only and read as zeros elsewhere."""
    model = _model(SETTINGS["pruning"])
    comp, attn = model.cache_policy.compressor, model.blocks[0].attn
    with torch.no_grad():  # the calibration batch of _model, recomputed by hand for layer 0
        emb = model.blocks[0].attn_norm(model.embed(_ids(seed=5)))
        cos, sin = model.rotary(torch.arange(T).expand(2, T))
        q, k, _ = attn.project(emb, cos, sin)
        qn = q.view(2, 2, 2, T, -1).pow(2).sum((0, 3)).sqrt()  # (H_kv, g, hd)
        scores = (qn * k.pow(2).sum((0, 2)).sqrt()[:, None]).sum(1)
        expect = scores.topk(comp.n_keep, -1).indices.sort(-1).values
        assert torch.equal(comp.channels[0], expect)
        kk, _, codes = comp.kv(0, attn, emb, cos, sin)
    pruned = torch.ones(2, model.cfg.head_dim, dtype=torch.bool).scatter_(1, expect, False)  # (H_kv, hd)
    assert float(kk.abs()[:, pruned[:, None, :].expand(-1, T, -1)].sum()) == 0.0
    torch.testing.assert_close(kk[:, ~pruned[:, None, :].expand(-1, T, -1)], k[:, ~pruned[:, None, :].expand(-1, T, -1)])
    assert codes["k"].shape == (2, 2, T, comp.n_keep)


def test_compressor_settings_out_of_range_are_one_line_errors():
    for bad, msg in [
        (dict(name="quantized", bits=3), "compressor.bits=3 is invalid"),
        (dict(name="quantized", group_size=32, residual=40), "compressor.residual=40 is invalid"),
        (dict(name="svd", rank=0), "compressor.rank=0 is out of range"),
        (dict(name="pruning", keep_channels=1.5), "compressor.keep_channels=1.5"),
        (dict(name="zip"), "compressor.name='zip' is invalid"),
    ]:
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            CacheConfig(compressor=CompressorConfig.from_any(bad)).validate()
    with pytest.raises(ConfigError, match="kv_bits=4 and model.init_args.cache.compressor.name=svd"):
        CacheConfig(policy="flexgen", kv_bits=4, compressor=CompressorConfig(name="svd")).validate()
    with pytest.raises(ConfigError, match="exceeds head_dim"):
        _model(dict(name="svd", rank=64))


def test_a_run_switches_to_lora_mid_run_and_resumes_with_its_factors_and_optimizer(tmp_path):
    """'Distil dense for a few steps, then under lora': CachePolicySwitch attaches the latent (initialised from
    the weights reached), trains it in its own groups, and a resume restores factors and optimizer state."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pikv_train.callbacks import CachePolicySwitch
    from pikv_train.data import TextDataModule
    from pikv_train.tasks import LanguageModelTask

    def fit(steps, ckpt_path=None):
        task = LanguageModelTask(model=ModelConfig.preset("nano", n_head=4, n_kv_head=2))
        switch = CachePolicySwitch(at_step=2, cache=CacheConfig(compressor=CompressorConfig(name="lora", rank=0.5)))
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[switch, ckpt],
                            default_root_dir=tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=2), ckpt_path=ckpt_path)
        return task, trainer

    task, trainer = fit(4)
    comp = task.model.cache_policy.compressor
    assert type(comp).__name__ == "LoRACompressor" and not task.model.blocks[0].attn.kv_proj.weight.requires_grad
    roles = {g.get("pikv_hook_params"): g for g in trainer.optimizers[0].param_groups}
    assert roles["compressor_up"]["params"] == [comp.up_k, comp.up_v]
    assert all(p.requires_grad for g in trainer.optimizers[0].param_groups for p in g["params"])
    ref = comp.up_k.detach().clone()
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)
    assert saved["pikv_cache_policy"]["compressor"]["name"] == "lora"
    at_3 = saved["state_dict"]["model.cache_policy.compressor.up_k"]
    # The checkpoint's own K/V projection holds the folded latent (what student_init / a teacher load reads).
    up, down = at_3[0], saved["state_dict"]["model.cache_policy.compressor.down_k"][0]
    folded = (up @ down).reshape(-1, down.shape[-1])  # (H_kv * hd, d)
    torch.testing.assert_close(saved["state_dict"]["model.blocks.0.attn.kv_proj.weight"][: folded.shape[0]], folded)
    task2, trainer2 = fit(4, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert not torch.equal(at_3, ref)  # the factors trained after the switch
    torch.testing.assert_close(task2.model.cache_policy.compressor.up_k.detach(), ref)  # the same step 4


def test_a_dense_checkpoint_validated_under_lora_starts_its_factors_from_that_checkpoint(tmp_path):
    """Evaluating a dense-trained student under ``lora`` (training-free): the factors come from the SVD of the
    checkpoint's own K/V projections (not of the random weights the task was built with), so the validation
    loss equals Palu's ``svd`` at the same rank."""
    import lightning as L

    from pikv_train.data import TextDataModule
    from pikv_train.tasks import LanguageModelTask

    def trainer():
        return L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=2)

    data = lambda: TextDataModule(max_documents=8, seq_len=32, batch_size=2)  # noqa: E731
    cfg = ModelConfig.preset("nano", n_head=4, n_kv_head=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer()
        t.fit(LanguageModelTask(model=cfg), datamodule=data())
        ckpt = tmp_path / "dense.ckpt"
        t.save_checkpoint(ckpt)
        losses = {}
        for name in ("svd", "lora", "none"):
            task = LanguageModelTask(model=cfg, cache=CacheConfig(compressor=CompressorConfig(name=name, rank=0.5)))
            losses[name] = trainer().validate(task, datamodule=data(), ckpt_path=ckpt, verbose=False)[0]["val/loss"]
    assert losses["lora"] == pytest.approx(losses["svd"], rel=1e-5)
    assert abs(losses["svd"] - losses["none"]) > 1e-4


def test_pyramid_keeps_every_token_demotes_by_attention_and_meets_its_byte_budget():
    """MiKV: nothing dropped; at each decision the least-attended tokens outside the recent window go down a tier
    (never up), with equal full and middle tiers sized by the byte budget; bytes_stored counts what is held."""
    comp_cfg = dict(name="pyramid", group_size=16, recent=4, tier_every=4, byte_budget=0.6)
    model = _model(comp_cfg)
    comp = model.cache_policy.compressor
    cache = model.new_cache()
    x, history = _ids(), []
    with torch.no_grad():
        model(x[:, :1], positions=torch.zeros(2, 1, dtype=torch.long), cache=cache)
        for t in range(1, T):
            model(x[:, t: t + 1], positions=torch.full((2, 1), t), cache=cache)
            history.append(torch.stack([st["kv"].tier for row in cache.store[1] for st in row]).clone().long())
    held = 0
    full, mid, low = comp.token_bytes(4)
    for layer in cache.store:
        for row in layer:
            for st in row:
                store = st["kv"]
                assert len(store.tier) == T and len(st["pos"]) == T  # no token left behind
                n = [int((store.tier == i).sum()) for i in range(3)]
                assert n[2] > 0 and n[1] > 0  # the budget really demotes at this length
                kv = n[0] * full + n[1] * mid + n[2] * low
                last = 4 * ((T - 1) // 4)  # the last decision, at row 36; rows 36..39 arrived at full precision
                assert kv <= comp.cfg.byte_budget * last * full + (T - last) * full
                held += store.nbytes()
                assert store.nbytes() == pytest.approx(kv + 8 * T + T)  # + float64 importance + int8 tier per token
    for a, b in zip(history, history[1:]):
        assert bool((b[:, : a.shape[1]] >= a).all())  # demotion only
    assert cache.bytes_stored() == held + sum(st["pos"].numel() * 8 for layer in cache.store for row in layer for st in row)


def test_pyramid_store_tiers_by_accumulated_attention_and_stores_the_tier_forms():
    from pikv_train.cache.compression.pyramid import PyramidStore

    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=16)  # head_dim 16
    comp = build_policy(CacheConfig(compressor=dict(name="pyramid", group_size=16, recent=2, tier_every=4,
                                                    byte_budget=0.6)), cfg).compressor
    k, v = torch.randn(12, 16), torch.randn(12, 16)
    store, pos = PyramidStore(comp, k), torch.arange(12)
    store.commit({"k": k, "v": v}, pos, torch.ones(12, dtype=torch.bool))
    imp = torch.tensor([5.0, 1, 9, 3, 8, 2, 7, 4, 6, 0.5, 0, 0], dtype=torch.float64)
    store.imp = imp.clone()
    rk, rv = store.read(12, pos)
    x = int(comp.top_count(torch.tensor(12), torch.tensor(2), torch.tensor(10), 4))
    assert x == 3  # 0.6 x 12 x 128 bytes - 2 recent at full - 10 at the lowest tier, over (full + middle - 2 lowest)
    order = imp[:10].argsort(descending=True)
    expect = torch.full((12,), 2, dtype=torch.int8)
    expect[order[:x]], expect[order[x: 2 * x]], expect[10:] = 0, 1, 0
    assert torch.equal(store.tier, expect)
    # The next decision refills the full-precision tier from the tokens still at full precision: a demoted token
    # with the largest score does not climb back.
    store.imp[order[x]] = 100.0  # a middle-tier token that now leads
    store.commit({"k": torch.randn(4, 16), "v": torch.randn(4, 16)}, torch.arange(16), torch.ones(16, dtype=torch.bool))
    before = store.tier.clone()
    store.read(16, torch.arange(16))
    assert store.tier[order[x]] == 1 and bool((store.tier >= before).all())
    mid, low = comp.forms(k)
    mid_v, low_v = comp.forms(v)
    for tier, kk, vv in ((0, k, v), (1, mid, mid_v), (2, low, low_v)):
        sel = expect == tier
        torch.testing.assert_close(rk[sel], kk[sel], rtol=0, atol=0)
        torch.testing.assert_close(rv[sel], vv[sel], rtol=0, atol=0)
    assert not torch.equal(mid, k) and not torch.equal(low, mid)


def test_policies_score_with_the_tier_each_key_sits_in_at_the_row_they_score_for():
    """Versions.logits (what H2O, LRU, AdaKV and Quest score with under MiKV): with batch, kv-heads and query
    groups all > 1, rows scoring at block c see every key in its form at c, as the cache holds them."""
    from pikv_train.cache.compression import PyramidCompressor
    from pikv_train.cache.compression.base import scoring_logits

    cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=32, d_ff=16)  # head_dim 8, groups of 2
    comp = PyramidCompressor(CompressorConfig(name="pyramid", group_size=8, recent=2, tier_every=4, byte_budget=0.6), cfg)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 24, 8, generator=g) * 3 for h in (4, 2, 2))
    ver = comp.versions(0, k, v, q=q)
    qg = q.double().view(2, 2, 2, 24, 8)
    for c in (3, 5):
        rows = torch.arange(4 * c - 3, 4 * c + 2)  # rows of block c - 1 and c
        got = scoring_logits(ver, qg[:, :, :, rows], k.double()[:, :, None], rows, lambda x: x.double()[:, :, None])
        for r_i, r in enumerate(rows.tolist()):
            keys = ver.keys_in_block(r // 4).double()  # (B, H_kv, T, hd)
            torch.testing.assert_close(got[:, :, :, r_i], (qg[:, :, :, r, None] @ keys[:, :, None].transpose(-1, -2))[:, :, :, 0])
    assert len(set(ver.chunk_tier[:, :, 5].flatten().tolist())) > 1 and not torch.equal(ver.chunk_tier[0], ver.chunk_tier[1])


def test_versioned_compressors_never_take_the_flexattention_path():
    """FlexAttention (CUDA) cannot read MiKV's / KIVI's stored forms: the policy builds its mask densely and SDPA
    runs over the forms, whatever ``use_flex`` says."""
    for comp in (dict(name="pyramid", group_size=16, recent=4, tier_every=4, byte_budget=0.6), SETTINGS["quantized"]):
        model = _model(comp, policy="streaming_llm", budget=0.5, n_sink=2, reference_len=64)
        x = _ids()
        with torch.no_grad():
            ref = model(x).hidden
            model.cache_policy.use_flex = True
            torch.testing.assert_close(model(x).hidden, ref, rtol=0, atol=0)


def test_leaving_lora_folds_the_trained_latent_into_the_projection_and_trains_it_again():
    from types import SimpleNamespace

    from pikv_train.callbacks import CachePolicySwitch
    from pikv_train.tasks.base import OptimConfig, build_optimizer

    model = _model(dict(name="lora", rank=0.5))
    comp = model.cache_policy.compressor
    with torch.no_grad():
        comp.up_k.add_(0.05 * torch.randn_like(comp.up_k))  # "trained" factors, away from the SVD start
    opt = build_optimizer(model, OptimConfig(), 10)["optimizer"]
    x = _ids()
    with torch.no_grad():
        under_lora = model(x).hidden
    w = model.blocks[0].attn.kv_proj.weight
    assert not w.requires_grad and all(w is not p for g in opt.param_groups for p in g["params"])
    cb = CachePolicySwitch(at_step=1, cache=CacheConfig())
    cb.on_train_batch_start(SimpleNamespace(global_step=1, optimizers=[opt]), SimpleNamespace(student_model=model), None, 0)
    assert model.cache_policy is None and w.requires_grad
    assert any(w is p for p in opt.param_groups[0]["params"])  # back in the decayed group
    with torch.no_grad():
        torch.testing.assert_close(model(x).hidden, under_lora, rtol=1e-4, atol=1e-5)  # the fold is exact


def test_think_does_not_calibrate_on_evaluation_batches():
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=64, max_seq_len=64)
    model = Decoder(cfg)
    model.set_cache_policy(build_policy(CacheConfig(compressor=SETTINGS["pruning"]), cfg))
    comp = model.cache_policy.compressor
    model.eval()
    with pytest.warns(UserWarning, match="not calibrated yet"), torch.no_grad():
        model(_ids())  # e.g. Lightning's sanity check
    assert not bool(comp.calibrated.any())
    model.train()
    model(_ids(seed=9))
    assert bool(comp.calibrated.all())


def test_rounding_compressors_read_exactly_what_the_cache_stores_in_bf16():
    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=16)
    comp = QuantizedCompressor(CompressorConfig(name="quantized", bits=2, group_size=4, residual=4), cfg)
    k = torch.randn(1, 1, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    ver = comp.versions(0, k, k)
    assert torch.equal(ver.keys[0], comp.quantized_keys(k))  # no double rounding through the STE


def test_attention_targets_under_pyramid_read_each_key_in_its_tier():
    from pikv_train.models.attention import attention_probs

    model = _model(dict(name="pyramid", group_size=16, recent=2, tier_every=4, byte_budget=0.5))
    comp, attn = model.cache_policy.compressor, model.blocks[0].attn
    with torch.no_grad():
        h = model.blocks[0].attn_norm(model.embed(_ids()))
        cos, sin = model.rotary(torch.arange(T).expand(2, T))
        q, k, v = attn.project(h, cos, sin)
        ver = comp.versions(0, k, v, q=q)
        probs = attention_probs(q, k, None, 2, ver)
        forms = torch.stack([k, *comp.forms(k)])  # (3, B, H_kv, T, hd)
        idx = ver.key_index.long()  # (B, H_kv, T, T)
        f = forms.permute(1, 2, 3, 0, 4)  # (B, H_kv, T (key j), 3 forms, hd)
        bi, hi = torch.arange(2)[:, None, None, None], torch.arange(2)[None, :, None, None]
        kk = f[bi, hi, torch.arange(T)[None, None, None, :], idx]  # (B, H_kv, T (row t), T (key j), hd)
        logits = torch.einsum("bhgtd,bhtjd->bhgtj", q.view(2, 2, 2, T, -1), kk) / k.shape[-1] ** 0.5
        expect = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1).flatten(1, 2)
    assert int((idx > 0).sum()) > 0
    torch.testing.assert_close(probs, expect, rtol=1e-4, atol=1e-6)


def test_pyramid_block_attention_equals_per_pair_forms_with_straight_through_gradients():
    """MiKV's training attention (row blocks of tier_every, each reading every key in its tier at that block,
    keys beyond the block's last row skipped) equals one SDPA over the three concatenated forms with pair
    (t, j) reading tier key_index[t, j]: outputs and the straight-through gradients of q, k and v. 22 rows in
    blocks of 4 leave a partial last block."""
    from pikv_train.cache.compression import PyramidCompressor
    from pikv_train.cache.compression.base import Versions
    from pikv_train.models.attention import attend

    cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=32, d_ff=16)  # head_dim 8
    comp = PyramidCompressor(CompressorConfig(name="pyramid", group_size=8, recent=2, tier_every=4, byte_budget=0.6), cfg)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, h, 22, 8, generator=g) * s for h, s in ((4, 3.0), (2, 3.0), (2, 1.0))]
    outs, grads = [], []
    for blocks in (True, False):
        q, k, v = (x.clone().requires_grad_() for x in base)
        ver = comp.versions(0, k, v, q=q)
        if not blocks:
            causal = torch.ones(22, 22, dtype=torch.bool).tril()
            ver = Versions(keys=ver.keys, values=ver.values, select=[causal & (ver.key_index == i) for i in range(3)])
        else:
            assert {1, 2} <= set(ver.key_index.unique().tolist())  # tokens really sit in the lower tiers
        y = attend(q, k, v, None, 2, ver)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad for x in (q, k, v)])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5 * float(outs[1].abs().max()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_pyramid_ranking_is_the_policies_rule_with_positions_as_tiebreak():
    """MiKV's one-sort ranking picks the same set as the policies' top_n_mask with the positions as tiebreak
    (exact ties to the more recent token; -inf never chosen), on scores full of ties."""
    from pikv_train.cache.compression.pyramid import top_n_mask
    from pikv_train.cache.policies.base import top_n_mask as policies_rule

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        s = torch.randint(0, 4, (3, 2, 17), generator=g).double()
        s[torch.rand(s.shape, generator=g) < 0.2] = float("-inf")
        n = torch.randint(0, 18, (3, 2), generator=g)
        assert torch.equal(top_n_mask(s, n), policies_rule(s, n, torch.arange(17).double()))


def test_pyramid_store_keeps_the_codes_of_the_middle_tier_tokens_that_stay_when_another_one_goes_down():
    """A re-tier that sends one middle-tier token to the lowest tier while later middle-tier tokens stay: every
    token still decodes to its tier's form (the staying tokens' codes are not shifted into the leaver's slot)."""
    from pikv_train.cache.compression import PyramidCompressor
    from pikv_train.cache.compression import pyramid as P
    from pikv_train.cache.compression.pyramid import PyramidStore

    cfg = ModelConfig(n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=32)  # head_dim 8
    comp = PyramidCompressor(CompressorConfig(name="pyramid", group_size=4, recent=0, tier_every=1, byte_budget=0.9), cfg)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    store, pos = PyramidStore(comp, k), torch.arange(6)
    store.commit({"k": k, "v": v}, pos, torch.ones(6, dtype=torch.bool))
    forms = lambda x, tier: torch.where((tier == 0)[:, None], x, torch.where((tier == 1)[:, None], *comp.forms(x)))  # noqa: E731
    for steps in ([1, 1, 1, 0, 0, 0], [1, 2, 1, 0, 2, 0], [2, 2, 1, 1, 2, 0]):
        new = torch.tensor(steps)
        orig, P.assign_tiers = P.assign_tiers, lambda imp, tier, cand, x: new
        try:
            store._retier(10, pos)
        finally:
            P.assign_tiers = orig
        assert store.tier.tolist() == steps
        got_k, got_v = store._decode()
        torch.testing.assert_close(got_k, forms(k, new), rtol=0, atol=0)
        torch.testing.assert_close(got_v, forms(v, new), rtol=0, atol=0)


def test_a_joint_pyramid_and_policy_forward_logs_each_layer_once():
    """Several rounds of the policy pass under MiKV, one set of cache statistics: bytes summed over the layers,
    kept fraction averaged over them, as the last round of each layer gave them."""
    from pikv_train.cache.policies.base import CachePolicy

    model = _model(dict(name="pyramid", group_size=16, recent=4, tier_every=4, byte_budget=0.8), policy="h2o",
                   budget=0.25, chunk_size=4, n_sink=2, reference_len=T)
    last = {}
    orig = CachePolicy.log_stats

    def spy(self, ctx, vis, budget, k):
        orig(self, ctx, vis, budget, k)
        t = k.shape[2]
        last[ctx.layer_idx] = (float((vis.float() / torch.arange(1, t + 1)).mean()),
                               float(vis[..., -1].float().sum(1).mean() * self.bytes_per_token_head(k)))

    CachePolicy.log_stats = spy
    try:
        with torch.no_grad():
            stats = model(_ids()).stats
    finally:
        CachePolicy.log_stats = orig
    assert len(last) == 2
    assert float(stats["cache/bytes_stored"]) == pytest.approx(sum(b for _, b in last.values()), rel=1e-6)
    assert float(stats["cache/kept_fraction"]) == pytest.approx(sum(f for f, _ in last.values()) / 2, rel=1e-6)
