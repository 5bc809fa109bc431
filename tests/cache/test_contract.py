"""SPEC §7, train exactly what you deploy: for every configuration, token-by-token decoding with the deployed
cache (``Decoder.new_cache()``) equals the parallel training forward (<= 1e-4 relative, fp32) on a model with
peaky attention.

The grid is sampled, not full: every value of every axis appears, every (policy, budget) pair appears, and
the chunk-sequential policies (whose decisions depend on attention) meet every chunk size at every evicting
budget. Adding an axis is one line in ``AXES`` plus, if the value needs wiring, one line in ``_build``.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.models import Decoder, ModelConfig
from pikv_train.models.config import MoEConfig
from pikv_train.routing import RouterConfig

T = 48  # also the budgets' reference length: chunk 4 divides it, chunk 5 does not
PREFILL = 7
AXES = {
    "policy": ["full", "streaming_llm", "h2o", "quest", "flexgen", "lru", "lru_plus", "ada_kv", "duo_attention"],
    "budget": [0.25, 0.5, 1.0],
    "chunk": [1, 4, 5],
    "sharding": ["off", "by_routing", "by_score", "by_routing+shard_budget", "by_score+shard_budget"],
    "kv_bits": [0, 4],
    "router": ["topk_balanced", "eplb", "adaptive", "pikv", "hierarchical"],
    "compressor": ["none", "quantized", "pyramid", "svd", "lora", "lora_plus", "pruning"],
}
COMPRESSORS = {  # small groups / residual so that KIVI quantizes within T; ranks and channel shares of head_dim 8
    "none": {},
    "quantized": dict(name="quantized", bits=2, group_size=4, residual=8),
    "pyramid": dict(name="pyramid", group_size=4, recent=4, tier_every=4, byte_budget=0.8),  # all three tiers fill
    "svd": dict(name="svd", rank=0.5),
    "lora": dict(name="lora", rank=0.25),
    "lora_plus": dict(name="lora_plus", rank=0.5),
    "pruning": dict(name="pruning", keep_channels=0.5),
}
CHUNKED = {"h2o", "lru", "lru_plus", "ada_kv"}  # decisions depend on attention and on the chunk size


def _cases() -> list[dict]:
    """The sampled grid: each (policy, budget) once (every chunk size for the chunked policies at an evicting
    budget); the other axes advance one step per case, so all their values appear in every few cases."""
    cycles = {a: itertools.cycle(v) for a, v in AXES.items() if a not in ("policy", "budget", "chunk")}
    chunk_cycle = itertools.cycle(AXES["chunk"])
    out = []
    for policy in AXES["policy"]:
        for budget in AXES["budget"]:
            chunks = AXES["chunk"] if policy in CHUNKED and budget < 1 else [next(chunk_cycle)]
            for chunk in chunks:
                case = dict(policy=policy, budget=budget, chunk=chunk, **{a: next(c) for a, c in cycles.items()})
                if policy != "flexgen" and case["compressor"] != "none":
                    case["kv_bits"] = 0  # FlexGen's own quantizer: refused beside a compressor (and unused elsewhere)
                if policy == "flexgen":  # kv_bits is FlexGen's knob: both values at evicting budgets
                    case["kv_bits"] = 4 if budget != 0.5 else 0
                    if case["kv_bits"]:  # one quantizer at a time (refused)
                        case["compressor"] = "none"
                out.append(case)
    return out


CASES = _cases()


def test_the_sampled_grid_covers_every_value_of_every_axis():
    for axis, values in AXES.items():
        assert {c[axis] for c in CASES} == set(values), axis
    for policy in CHUNKED:
        for budget in (0.25, 0.5):
            assert {c["chunk"] for c in CASES if c["policy"] == policy and c["budget"] == budget} == set(AXES["chunk"])


def _build(case: dict, calibration=None) -> Decoder:
    torch.manual_seed(0)
    router = RouterConfig(name=case["router"], top_k=2, k_min=1, n_groups=2, topk_groups=1, p_threshold=0.5)
    cfg = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=32, max_seq_len=T,
                      moe=MoEConfig(n_experts=4, d_expert=32, router=router))
    model = Decoder(cfg)
    with torch.no_grad():  # peaky attention: large q/k (most rows put > 0.5 of their mass on one key)
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(20.0)
            blk.attn.kv_proj.weight[: cfg.n_kv_head * cfg.head_dim].mul_(20.0)
    if case["sharding"] != "off":
        mode, _, budget = case["sharding"].partition("+")
        model.set_kv_sharding(build_sharding(ShardingConfig(
            enabled=True, read_mode=mode, n_sink=1, window=3, read_shards=1, shard_budget=6 if budget else None), cfg))
    if case["policy"] != "full":
        pol = build_policy(CacheConfig(
            policy=case["policy"], budget=case["budget"], chunk_size=case["chunk"], n_sink=2, page_size=4,
            quest_dense_layers=1, snap_window=6, snap_kernel=3, kv_bits=case["kv_bits"], kv_group_size=8,
            attn_sparsity=0.5 if case["policy"] == "flexgen" and case["budget"] == 0.5 else 1.0,
            compressor=COMPRESSORS[case.get("compressor", "none")],
        ), cfg)
        if case["policy"] == "duo_attention":
            with torch.no_grad():
                pol.gates.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.7]]))  # retrieval and streaming heads
        model.set_cache_policy(pol)
    elif case.get("compressor", "none") != "none":
        model.set_cache_policy(build_policy(CacheConfig(compressor=COMPRESSORS[case["compressor"]]), cfg))
    if case.get("compressor") == "pruning":  # ThinK's static channels, calibrated on a batch of "training data"
        model.cache_policy.compressor.calibrate(model, torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(7)))
    return model.eval()


def _id(case):
    return "-".join(str(case[a]) for a in AXES)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_decoding_with_the_deployed_cache_equals_the_training_forward(case):
    model = _build(case)
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # budget 1.0 warns that the policy is skipped
        train = model.logits(model(x).hidden)
        dec = decode_tokenwise(model, model.new_cache(), x, PREFILL)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    lossy = case["policy"] not in ("full", "flexgen") or case["kv_bits"] or case["budget"] == 0.5
    if (case["budget"] < 1 and lossy) or case["compressor"] != "none":  # the cache really changes what is computed
        plain = _build({**case, "policy": "full", "sharding": "off", "compressor": "none"})  # same weights, nothing on
        with torch.no_grad():
            assert float((plain.logits(plain(x).hidden) - train).abs().max()) > 1e-3 * scale


LENGTHS = [  # (policy, budget, chunk, reference length L, sequence length T): L not a multiple of the page or
    # the chunk, sequences longer and shorter than L (the policy must act past L even at budget 1.0)
    ("quest", 1.0, 4, 50, 50), ("quest", 0.5, 4, 50, 50), ("h2o", 1.0, 5, 30, 48), ("lru", 0.5, 4, 30, 48),
    ("lru_plus", 1.0, 1, 30, 48), ("ada_kv", 1.0, 5, 30, 48), ("streaming_llm", 1.0, 4, 30, 48),
    ("h2o", 0.5, 5, 64, 40), ("ada_kv", 0.25, 4, 64, 40),
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("policy,budget,chunk,ref,t", LENGTHS, ids=lambda v: str(v))
def test_decoding_equals_training_when_the_sequence_and_the_reference_length_differ(policy, budget, chunk, ref, t):
    case = dict(policy="full", budget=budget, chunk=chunk, sharding="by_score", kv_bits=0, router="topk_balanced")
    model = _build(case)
    model.cfg.max_seq_len = 64
    model.rotary = type(model.rotary)(model.cfg.head_dim, 64, model.cfg.rope_base)
    model.set_cache_policy(build_policy(CacheConfig(
        policy=policy, budget=budget, chunk_size=chunk, n_sink=2, page_size=16 if policy == "quest" else 4,
        quest_dense_layers=1, snap_window=6, snap_kernel=3, reference_len=ref), model.cfg))
    x = torch.randint(0, 258, (2, t), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = model.logits(model(x).hidden)
        dec = decode_tokenwise(model, model.new_cache(), x, PREFILL)
        model.set_cache_policy(None)
        unrestricted = model.logits(model(x).hidden)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    assert float((unrestricted - train).abs().max()) > 1e-3 * scale  # the policy acts at these lengths


def _pairs() -> list[dict]:
    """Every (policy, compressor) pair at an evicting budget, the other axes cycling."""
    cycles = {a: itertools.cycle(AXES[a]) for a in ("sharding", "router")}
    chunks = itertools.cycle([1, 4, 5])
    out = []
    for policy in AXES["policy"]:
        for comp in AXES["compressor"][1:]:
            # FlexGen at budget 0.5 has sparse values on (attn_sparsity 0.5 in _build) over each compressor's stored
            # forms, at 0.25 placement only
            for budget in (0.5, 0.25) if policy == "flexgen" else (0.5,):
                out.append(dict(policy=policy, budget=budget, chunk=next(chunks), kv_bits=0,
                                compressor=comp, **{a: next(c) for a, c in cycles.items()}))
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", _pairs(), ids=_id)
def test_every_policy_decodes_its_compressed_cache_as_it_trained(case):
    """SPEC §6/§7: each storage compressor with each policy: token-by-token decoding with the compressed cache
    equals the compressed training forward, and the compressor really changes the logits."""
    model = _build(case)
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = model.logits(model(x).hidden)
        cache = model.new_cache()
        dec = decode_tokenwise(model, cache, x, PREFILL)
        model.cache_policy.compressor = None  # the same policy, keys/values stored as computed
        plain = model.logits(model(x).hidden)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    assert float((plain - train).abs().max()) > 1e-3 * scale


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tier_every", [1, 5])
def test_pyramid_decodes_as_it_trained_when_its_decisions_do_not_divide_the_sequence(tier_every):
    """MiKV's training attention runs per block of tier_every rows (every row of a block reads each key in one
    tier); 48 rows in blocks of 5 leave a partial last block, blocks of 1 are MiKV's per-step decisions."""
    case = dict(policy="streaming_llm", budget=0.5, chunk=4, sharding="by_routing", kv_bits=0, router="eplb")
    model = _build(case)
    comp = {**COMPRESSORS["pyramid"], "tier_every": tier_every}
    model.set_cache_policy(build_policy(CacheConfig(policy="streaming_llm", budget=0.5, n_sink=2, compressor=comp),
                                        model.cfg))
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = model.logits(model(x).hidden)
        dec = decode_tokenwise(model, model.new_cache(), x, PREFILL)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("policy,sharding", [("full", "by_routing+shard_budget"), ("full", "by_score+shard_budget"),
                                             ("h2o", "by_score+shard_budget"), ("ada_kv", "by_routing+shard_budget"),
                                             ("quest", "by_score+shard_budget"), ("streaming_llm", "by_routing+shard_budget"),
                                             ("duo_attention", "by_score+shard_budget"), ("lru_plus", "by_routing+shard_budget")])
def test_pyramid_under_per_shard_budgets_decodes_as_it_trained(policy, sharding):
    """MiKV's tiers with expert sharding's per-shard budgets (what each row reads; under ``policy: full`` also
    what the cache holds, a key leaving once no shard holds it): decoding equals training, and the shard budget
    really changes the logits."""
    case = dict(policy=policy, budget=0.5, chunk=4, sharding=sharding, kv_bits=0, router="eplb", compressor="pyramid")
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(case)
        train = model.logits(model(x).hidden)
        dec = decode_tokenwise(model, model.new_cache(), x, PREFILL)
        unbounded = _build({**case, "sharding": sharding.split("+")[0]})
        free = unbounded.logits(unbounded(x).hidden)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    assert float((free - train).abs().max()) > 1e-3 * scale


TOKEN = {  # small windows / chunks so that every decision kind happens within T
    "pyramid_kv": dict(name="pyramid_kv", obs_window=6, pyramid_beta=4),
    "chunk_kv": dict(name="chunk_kv", obs_window=6, chunk_length=3, reuse_layers=2),
    "fastv": dict(name="fastv", obs_window=6, fastv_layer=1, fastv_ratio=0.5),
    "distillation": dict(name="distillation", obs_window=6, distill_rank=4),
}


def _token_cases() -> list[dict]:
    """Each token compressor at every chunk size (prefill 7), and at budget 1.0 with a 30-token prefill (decisions
    inside one cache step; per-layer budgets and whole chunks still act at the full budget); the sharding modes and
    routers cycling."""
    cycles = {a: itertools.cycle(AXES[a]) for a in ("sharding", "router")}
    out = [dict(policy="full", budget=0.5, chunk=chunk, kv_bits=0, compressor=comp, prefill=PREFILL,
                **{a: next(c) for a, c in cycles.items()}) for comp in TOKEN for chunk in AXES["chunk"]]
    return out + [dict(policy="full", budget=1.0, chunk=5, kv_bits=0, compressor=comp, prefill=30,
                       **{a: next(c) for a, c in cycles.items()}) for comp in TOKEN]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", _token_cases(), ids=_id)
def test_token_compressors_decode_as_they_trained(case):
    """SPEC §6/§7: FastV, PyramidKV, ChunkKV and KV-Distill decided causally: token-by-token decoding with their
    cache equals the training forward, with and without expert sharding, and the compressor really changes the
    logits (KV-Distill's adapters are random here, so the kept tokens are read in a form of their own)."""
    model = _build({**case, "compressor": "none"})
    cfg = model.cfg
    model.set_cache_policy(build_policy(CacheConfig(budget=case["budget"], chunk_size=case["chunk"],
                                                    compressor=TOKEN[case["compressor"]]), cfg))
    if case["compressor"] == "distillation":
        with torch.no_grad():
            for b in model.cache_policy.compressor.lora_b:
                b.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = model.logits(model(x).hidden)
        dec = decode_tokenwise(model, model.new_cache(), x, case["prefill"])
        model.set_cache_policy(None)
        plain = model.logits(model(x).hidden)
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    if case["budget"] < 1 or case["compressor"] in ("pyramid_kv", "fastv"):  # at 1.0 chunk_kv keeps 14 chunks of 3
        assert float((plain - train).abs().max()) > 1e-3 * scale
