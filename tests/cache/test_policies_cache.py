"""Cache policies at inference: the policy's cache equals the masked parallel forward for the exact
policies, really shrinks storage, plugs into generate; FlexAttention path; config errors; the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, H2OScheduler, StreamingLLMScheduler, build_policy
from pikv_train.errors import ConfigError
from pikv_train.models import Decoder, ModelConfig, generate

T = 32
pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = {
    "streaming_llm": dict(budget=12, n_sink=2),
    "quest": dict(budget=12, page_size=4, quest_dense_layers=1),
    "ada_kv": dict(budget=12, snap_window=6, chunk_size=3, snap_kernel=3),  # C < w: some window keys stay
    "duo_attention": dict(budget=12, n_sink=2),
    "flexgen": dict(budget=10),
}


def _model(preset, name, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, n_head=4, n_kv_head=2)
    model = Decoder(cfg)
    pol = build_policy(CacheConfig(policy=name, **kw), cfg)
    if name == "duo_attention":
        with torch.no_grad():
            pol.gates.copy_(torch.tensor([[1.0, 0.0], [0.2, 0.9]]))  # a mix of retrieval and streaming heads
    model.set_cache_policy(pol)
    return model.eval(), pol  # eval after attaching: DuoAttention uses hard gates


def _decode(model, cache, x, prefill=7):
    return decode_tokenwise(model, cache, x, prefill)


@pytest.mark.parametrize("preset,name", [("nano", n) for n in EXACT] + [("nano-moe", "streaming_llm"), ("nano-moe", "ada_kv")])
def test_exact_policy_decoding_equals_masked_parallel_forward(preset, name):
    model, pol = _model(preset, name, **EXACT[name])
    x = torch.randint(0, 258, (2, T))
    full = model.logits(model(x).hidden)
    dec = _decode(model, pol.new_cache(model.cfg.n_layer, seq_len=T), x, prefill=9)
    torch.testing.assert_close(dec, full, atol=1e-4, rtol=1e-4)
    model.set_cache_policy(None)
    if name != "flexgen":  # the policy really changes the output (FlexGen only places memory)
        assert (model.logits(model(x).hidden) - full).abs().max() > 1e-3


def test_caches_store_only_the_budget():
    x = torch.randint(0, 258, (2, T))
    for name in ("streaming_llm", "h2o", "lru", "lru_plus", "ada_kv"):
        model, pol = _model("nano", name, budget=12, n_sink=2, chunk_size=4, snap_window=4)
        cache = pol.new_cache(model.cfg.n_layer)
        _decode(model, cache, x)
        lengths = torch.stack([cache.head_lengths(i) for i in range(model.cfg.n_layer)])  # (L, B, H_kv)
        if name == "ada_kv":
            assert lengths.sum(-1).max() <= 2 * 12  # shared per-layer budget
        else:
            assert lengths.max() <= 12, name
        hd = model.cfg.head_dim
        # Per-head storage, no fake keys: K/V (fp32) + an int64 position per stored key, plus the policy's state
        # (H2O: position, index, accumulated attention, keep flag; LRU/LRU+ also frequency and last use; AdaKV: the keep
        # flags and the observation window's queries).
        per_key = {"streaming_llm": 2 * hd * 4 + 8, "ada_kv": 2 * hd * 4 + 8 + 1,
                   "h2o": 2 * hd * 4 + 8 + 8 + 8 + 8 + 1}.get(name, 2 * hd * 4 + 8 + 8 + 8 + 3 * 8 + 1)
        extra = 0
        if name == "ada_kv":
            extra = sum(s["qwin"][0].numel() * 4 + s["qwin"][1].numel() * 8 for layer in cache.store for row in layer for s in row)
        assert cache.bytes_stored() == int(lengths.sum()) * per_key + extra, name
    model, pol = _model("nano", "flexgen", budget=10)
    cache = pol.new_cache(model.cfg.n_layer)
    _decode(model, cache, x)
    assert cache.bytes_on_device() == 2 * 2 * 2 * 10 * 2 * model.cfg.head_dim * 4  # L * B * H_kv * 10 tokens
    assert cache.bytes_on_host() == cache.bytes_on_device() * (T - 10) // 10


def test_generate_with_policy_cache_factory_and_batched_padding():
    model, pol = _model("nano", "h2o", budget=0.25, chunk_size=4)
    assert pol.new_cache(model.cfg.n_layer).budget == 16  # fractional budgets refer to max_seq_len (64)
    prompts = [torch.randint(0, 258, (n,)) for n in (5, 9)]
    gen = generate(model, prompts, 20, temperature=0, cache_factory=pol.new_cache)
    assert gen.tokens.shape == (2, 9 + 20) and bool(gen.generated[:, 9:].all())
    model, pol = _model("nano", "streaming_llm", budget=12, n_sink=2)
    one = generate(model, [prompts[0]], 20, temperature=0, cache_factory=pol.new_cache)
    two = generate(model, prompts, 20, temperature=0, cache_factory=pol.new_cache)
    assert torch.equal(one.tokens[0, -20:], two.tokens[0, -20:])  # left padding does not leak


@pytest.mark.parametrize("name", ["streaming_llm", "quest", "h2o", "ada_kv", "duo_attention"])
def test_flexattention_block_mask_path_equals_sdpa_mask_path(name):
    model, pol = _model("nano", name, **{**EXACT.get(name, dict(budget=12, chunk_size=4)), "quest_dense_layers": 0})
    x = torch.randint(0, 258, (1, 32))
    pol.use_blocks = False  # the reference: SDPA over the dense (T, T) mask
    ref = model(x).hidden
    pol.use_flex = True  # the CUDA path, run eagerly on CPU (no backward there)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(x).hidden
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_duo_attention_gates_are_trained_with_l1_penalty():
    model, pol = _model("nano", "duo_attention", budget=12, n_sink=2)
    model.train()
    out = model(torch.randint(0, 258, (2, T)))
    pen = out.stats["cache/l1_penalty"]
    loss = model.logits(out.hidden).logsumexp(-1).mean() + pen
    loss.backward()
    assert pol.gates.grad is not None and pol.gates.grad.abs().sum() > 0
    assert any(p is pol.gates for p in model.parameters())  # in the optimizer and the checkpoint
    assert {"cache/duo_gate_mean", "cache/duo_gate_l0", "cache/kept_fraction", "cache/bytes_stored"} <= set(out.stats)


def test_duo_attention_gates_are_clamped_after_each_step_and_full_budget_warns():
    from pikv_train.tasks import LanguageModelTask

    cfg = ModelConfig.preset("nano", n_head=4, n_kv_head=2)
    task = LanguageModelTask(model=cfg, cache=CacheConfig(policy="duo_attention", budget=12, n_sink=2))
    gates = task.model.cache_policy.gates
    with torch.no_grad():
        gates.copy_(torch.tensor([[1.7, -0.3], [0.4, 1.0]]))
    task.on_train_batch_end(None, None, 0)  # what Lightning calls after the optimizer step
    assert torch.equal(gates, torch.tensor([[1.0, 0.0], [0.4, 1.0]]))
    model, _ = _model("nano", "duo_attention", budget=1.0)
    model.train()
    with pytest.warns(UserWarning, match="covers the whole"):
        model(torch.randint(0, 258, (1, T)))


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan")])
def test_bad_budget_is_a_one_line_config_error(budget):
    with pytest.raises(ConfigError, match="cache.budget"):
        build_policy(CacheConfig(policy="h2o", budget=budget))


def test_other_config_errors():
    with pytest.raises(ConfigError, match="page_size"):
        model, _ = _model("nano", "quest", budget=8, page_size=16, quest_dense_layers=0)
        model(torch.randint(0, 258, (1, 32)))
    with pytest.raises(ConfigError, match="model config"):
        build_policy(CacheConfig(policy="duo_attention"))
    with pytest.raises(ConfigError, match="reference length"):
        StreamingLLMScheduler(CacheConfig(policy="streaming_llm", budget=0.5)).new_cache(2)
    assert H2OScheduler(CacheConfig(policy="h2o", budget=64)).new_cache(2).budget == 64


def test_task_trains_under_the_policy_from_its_cache_config():
    from pikv_train.tasks import LanguageModelTask

    task = LanguageModelTask(model=ModelConfig.preset("nano-moe"), cache=CacheConfig(policy="h2o", budget=0.25, chunk_size=8))
    assert isinstance(task.model.cache_policy, H2OScheduler)
    x = torch.randint(0, 258, (2, 32))
    out = task.model(x)
    assert 0.4 < float(out.stats["cache/kept_fraction"]) < 1.0 and float(out.stats["cache/evictions"]) > 0
    out.hidden.sum().backward()  # the masked forward trains


def test_cli_rejects_a_bad_budget(tmp_path):
    from helpers import lm_recipe, run_cli

    proc = run_cli("fit", "--config", str(lm_recipe(tmp_path, out="bad", steps=2)), "--model.init_args.cache.budget", "0")
    assert proc.returncode != 0
    # The ConfigError's one line reaches the user (cli.py prints it as ``error: ...`` once it unwraps
    # UserErrors that jsonargparse chains under its ValueError during class instantiation).
    assert "cache.budget=0.0 is out of range; use a fraction in (0, 1]" in proc.stderr


def test_policy_switch_callback_switches_at_step_and_trains_new_gates():
    from types import SimpleNamespace

    from pikv_train.callbacks import CachePolicySwitch

    from pikv_train.tasks.base import OptimConfig, build_optimizer

    model = Decoder(ModelConfig.preset("nano"))
    opt = build_optimizer(model, OptimConfig(), 10)["optimizer"]
    cb = CachePolicySwitch(at_step=3, cache=CacheConfig(policy="duo_attention", budget=8))
    trainer = SimpleNamespace(global_step=2, optimizers=[opt], world_size=1)
    module = SimpleNamespace(student_model=model)
    cb.on_train_batch_start(trainer, module, None, 0)
    assert model.cache_policy is None
    trainer.global_step = 3
    cb.on_train_batch_start(trainer, module, None, 0)
    assert type(model.cache_policy).__name__ == "DuoAttentionScheduler"
    assert opt.param_groups[2]["params"] == [model.cache_policy.gates]
    with pytest.raises(ConfigError, match="build_optimizer"):  # an optimizer without the hook group
        CachePolicySwitch(at_step=0, cache=CacheConfig(policy="h2o", budget=8)).on_train_batch_start(
            SimpleNamespace(global_step=0, optimizers=[torch.optim.AdamW(model.parameters())]), module, None, 0)
    # Under DDP a switch that adds parameters is refused up front (DDP could not synchronise them).
    cb = CachePolicySwitch(at_step=3, cache=CacheConfig(policy="duo_attention", budget=8))
    with pytest.raises(ConfigError, match="DDP cannot synchronise"):
        cb.on_fit_start(SimpleNamespace(world_size=2), module)
    CachePolicySwitch(at_step=3, cache=CacheConfig(policy="h2o", budget=8)).on_fit_start(SimpleNamespace(world_size=2), module)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["streaming_llm", "quest", "h2o", "duo_attention"])
def test_cuda_flexattention_training_forward_matches_cpu_masks(name):
    model, pol = _model("nano", name, **{**EXACT.get(name, dict(budget=12, chunk_size=4)), "quest_dense_layers": 0})
    model.train()
    x = torch.randint(0, 258, (2, 64))
    ref = model(x).hidden
    model.cuda()
    out = model(x.cuda())
    out.hidden.sum().backward()  # FlexAttention backward on CUDA
    torch.testing.assert_close(out.hidden.cpu(), ref, atol=2e-4, rtol=2e-4)


def test_run_resumed_after_a_switch_to_duo_attention_keeps_gates_and_optimizer(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pikv_train.callbacks import CachePolicySwitch
    from pikv_train.data import TextDataModule
    from pikv_train.tasks import LanguageModelTask

    def fit(steps, ckpt_path=None):
        task = LanguageModelTask(model=ModelConfig.preset("nano", n_head=4, n_kv_head=2))
        switches = [CachePolicySwitch(at_step=2, cache=CacheConfig(policy="duo_attention", budget=8, n_sink=2)),
                    CachePolicySwitch(at_step=5, cache=CacheConfig(policy="streaming_llm", budget=8, n_sink=2))]
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[*switches, ckpt],
                            default_root_dir=tmp_path)
        trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=2), ckpt_path=ckpt_path)
        return task, trainer

    task, _ = fit(4)
    ref_gates = task.model.cache_policy.gates.detach().clone()  # after step 4 of the uninterrupted run
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["pikv_cache_policy"]["policy"] == "duo_attention"
    gates_at_3 = saved["state_dict"]["model.cache_policy.gates"]
    assert not torch.equal(gates_at_3, torch.ones_like(gates_at_3))  # trained since the switch at step 2
    task2, trainer2 = fit(4, ckpt_path=path)  # one more step from step 3
    assert type(task2.model.cache_policy).__name__ == "DuoAttentionScheduler"
    opt = trainer2.optimizers[0]
    assert len(opt.param_groups) == 5 and opt.param_groups[2]["params"][0] is task2.model.cache_policy.gates
    torch.testing.assert_close(task2.model.cache_policy.gates.detach(), ref_gates)  # same step 4 as without the break
    assert [g["lr"] for g in opt.param_groups] == [opt.param_groups[0]["lr"]] * 5  # gates follow the schedule
    # A second switch, away from DuoAttention (the hook group empties), and a resume after it.
    task3, trainer3 = fit(6, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert type(task3.model.cache_policy).__name__ == "StreamingLLMScheduler"
    assert trainer3.optimizers[0].param_groups[2]["params"] == []
    task4, trainer4 = fit(7, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=6.ckpt")
    assert type(task4.model.cache_policy).__name__ == "StreamingLLMScheduler" and trainer4.global_step == 7


def test_checkpoints_with_the_two_group_optimizer_layout_are_upgraded():
    from pikv_train.tasks.base import HOOK_GROUP, upgrade_optimizer_state

    ckpt = {"optimizer_states": [{"state": {}, "param_groups": [{"params": [0, 1], "weight_decay": 0.1, "lr": 1.0},
                                                                 {"params": [2, 3, 4], "weight_decay": 0.0, "lr": 1.0}]}],
            "lr_schedulers": [{"base_lrs": [1.0, 1.0], "_last_lr": [0.5, 0.5], "lr_lambdas": [None, None]}]}
    upgrade_optimizer_state(ckpt, n_hook_params=1)  # the old layout kept a DuoAttention gate last in group 2
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["params"] for g in groups] == [[0, 1], [2, 3], [4], [], []]
    assert [g.get(HOOK_GROUP) for g in groups] == [None, None, "gates", "compressor_down", "compressor_up"]
    assert ckpt["lr_schedulers"][0]["_last_lr"] == [0.5] * 5


def test_validation_checkpoint_without_weights_is_left_to_the_strategy():
    """FSDP loads and pops the weights before on_load_checkpoint: nothing to adjust, no KeyError."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from pikv_train.tasks import LanguageModelTask

    task = LanguageModelTask(model=ModelConfig.preset("nano"), cache=CacheConfig(policy="streaming_llm", budget=8))
    task._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    task.on_load_checkpoint({"pikv_cache_policy": None})
    assert type(task.model.cache_policy).__name__ == "StreamingLLMScheduler"


def test_validate_any_checkpoint_under_any_policy(tmp_path):
    """validate (CLI subcommand / Trainer.validate) of a dense-trained checkpoint under a configured policy
    runs under that policy, and equals evaluate() with the policy set; a policy with gates works too."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pikv_train.data import TextDataModule
    from pikv_train.evaluate import evaluate, load_decoder
    from pikv_train.tasks import LanguageModelTask

    cfg = ModelConfig.preset("nano", n_head=4, n_kv_head=2)
    dm = lambda: TextDataModule(max_documents=8, seq_len=32, batch_size=2)  # noqa: E731
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    L.Trainer(max_steps=3, limit_val_batches=0, callbacks=[ckpt], **kw).fit(LanguageModelTask(model=cfg), datamodule=dm())
    path = tmp_path / "ckpt" / "last.ckpt"
    results = {}
    for name in ("full", "streaming_llm", "duo_attention"):
        cache = CacheConfig(policy=name, budget=8, n_sink=2)
        task = LanguageModelTask(model=cfg, cache=cache)
        results[name] = L.Trainer(limit_val_batches=3, **kw).validate(task, datamodule=dm(), ckpt_path=path)[0]["val/loss"]
        assert (task.model.cache_policy is None) == (name == "full")
    assert abs(results["streaming_llm"] - results["full"]) > 1e-4
    model, d = load_decoder(path), dm()
    d.setup("validate")
    model.set_cache_policy(build_policy(CacheConfig(policy="streaming_llm", budget=8, n_sink=2), cfg))
    ref = evaluate(model.eval(), d.val_dataloader(), max_batches=3)
    assert abs(ref["nll"] - results["streaming_llm"]) < 1e-5 * abs(ref["nll"])  # relative: rounding varies by CPU


@pytest.mark.parametrize("name", ["h2o", "lru", "lru_plus"])
def test_chunk_sequential_cache_with_budget_t_drops_nothing(name):
    """The inference cache gives heavy slots only to keys leaving the window too: with budget = T it
    stores and reads every key, so decoding equals full attention."""
    model, pol = _model("nano", name, budget=T, n_sink=2, chunk_size=4)
    x = torch.randint(0, 258, (2, T))
    cache = pol.new_cache(model.cfg.n_layer)
    dec = _decode(model, cache, x)
    model.set_cache_policy(None)
    torch.testing.assert_close(dec, model.logits(model(x).hidden), atol=1e-4, rtol=1e-4)
    assert int(cache.head_lengths(0).min()) == T
