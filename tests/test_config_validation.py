"""Config-level checks of setting values (issue 12): each bad value raises a one-line ConfigError naming the
setting's config path, the value, the valid range and the fix; each legal but probably unintended value
warns once. In-process and quick: no CLI, no training."""

from __future__ import annotations

import types

import pytest

from pikv_train import errors
from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.distill import DistiLLM2Config, DistiLLMConfig, SKDConfig
from pikv_train.distill.term import DistillLossConfig
from pikv_train.errors import ConfigError, DataError
from pikv_train.models.config import ModelConfig, MoEConfig
from pikv_train.routing.base import RouterConfig
from pikv_train.tasks.base import OptimConfig
from pikv_train.tasks.checks import check_cache_budget, check_positions


@pytest.fixture(autouse=True)
def _fresh_warnings():
    errors._WARNED.clear()
    yield
    errors._WARNED.clear()


@pytest.mark.parametrize("make,text", [
    (lambda: OptimConfig(lr=-1e-3), "model.init_args.optim.lr=-0.001 is invalid"),
    (lambda: OptimConfig(beta1=1.5), "model.init_args.optim.beta1=1.5 is invalid: must lie in [0, 1)"),
    (lambda: OptimConfig(beta2=-0.1), "optim.beta2=-0.1"),
    (lambda: OptimConfig(weight_decay=-1), "optim.weight_decay=-1"),
    (lambda: OptimConfig(warmup_steps=-5), "optim.warmup_steps=-5 is invalid: must be >= 0"),
    (lambda: OptimConfig(min_lr_ratio=5), "optim.min_lr_ratio=5 is invalid: must lie in [0, 1]"),
    (lambda: DistillLossConfig(temperature=0), "model.init_args.loss.temperature=0 is invalid: must be > 0"),
    (lambda: DistillLossConfig(divergence="jsd", beta=1.5), "loss.beta=1.5 is invalid: must lie in [0, 1]"),
    (lambda: DistillLossConfig(divergence="srkl", alpha=2), "loss.alpha=2 is invalid: must lie in [0, 1)"),
    (lambda: DistillLossConfig(divergence="skl", alpha=1.0), "no distillation signal"),
    (lambda: DistillLossConfig(kd_weight=0, ce_weight=0), "are both 0, so only the router losses would train"),
    (lambda: DistillLossConfig(chunk_size=0), "loss.chunk_size=0 is invalid: must be >= 1"),
    (lambda: ModelConfig(n_head=0), "model.init_args.{model|student}.n_head=0 is invalid: must be >= 1"),
    (lambda: ModelConfig(n_kv_head=0), ".n_kv_head=0"),
    (lambda: ModelConfig(n_layer=0), ".n_layer=0"),
    (lambda: ModelConfig(d_model=0), ".d_model=0"),
    (lambda: ModelConfig(vocab_size=0), ".vocab_size=0"),
    (lambda: ModelConfig(max_seq_len=0), ".max_seq_len=0"),
    (lambda: ModelConfig(d_model=130, n_head=4), ".d_model=130 is invalid: must be divisible by n_head=4"),
    (lambda: ModelConfig(n_head=4, n_kv_head=3), ".n_kv_head=3 is invalid: must divide n_head=4"),
    (lambda: ModelConfig(moe=MoEConfig(n_experts=0, router=RouterConfig(top_k=1))), "moe.n_experts=0 is invalid"),
    (lambda: ModelConfig(moe=MoEConfig(n_experts=2, router=RouterConfig(top_k=3))), "top_k=3 exceeds n_experts=2"),
    (lambda: RouterConfig(top_k=0), "moe.router.top_k=0 is invalid: must be >= 1; set"),
    (lambda: RouterConfig(capacity_factor=0.0), "moe.router.capacity_factor=0.0 is invalid: must be > 0"),
    (lambda: build_policy(CacheConfig(policy="h2o", budget=-0.5)), "model.init_args.cache.budget=-0.5 is out of range"),
    (lambda: build_policy(CacheConfig(policy="flexgen", kv_bits=3)), "model.init_args.cache.kv_bits=3 is invalid"),
    (lambda: DistiLLMConfig(alpha=1.0), "model.init_args.distillm.alpha=1.0 is invalid: must be < 1"),
    (lambda: DistiLLMConfig(init_phi=1.5), "distillm.init_phi=1.5"),
    (lambda: DistiLLMConfig(phi_step=-0.1), "distillm.phi_step=-0.1"),
    (lambda: DistiLLMConfig(loss_eps=-1), "distillm.loss_eps=-1"),
    (lambda: DistiLLMConfig(capacity=0), "distillm.capacity=0"),
    (lambda: DistiLLM2Config(alpha1=-0.1), "model.init_args.distillm2.alpha1=-0.1"),
    (lambda: DistiLLM2Config(alpha2=1.0), "distillm2.alpha2=1.0 is invalid: must be < 1"),
    (lambda: DistiLLM2Config(beta=2.5), "distillm2.beta=2.5 is invalid: must lie in [0, 2]"),
    (lambda: DistiLLM2Config(temperature=-1), "distillm2.temperature=-1"),
    (lambda: DistiLLM2Config(top_p=0), "distillm2.top_p=0 is invalid: must lie in (0, 1]"),
    (lambda: SKDConfig(gamma=0), "model.init_args.skd.gamma=0 is invalid: must be >= 1"),
    (lambda: SKDConfig(top_k=0), "skd.top_k=0"),
    (lambda: SKDConfig(student_temperature=-0.5), "skd.student_temperature=-0.5"),
    (lambda: SKDConfig(teacher_top_p=1.5), "skd.teacher_top_p=1.5 is invalid: must lie in (0, 1]"),
])
def test_bad_value_names_setting_value_range_and_fix(make, text):
    with pytest.raises(ConfigError) as e:
        make()
    msg = str(e.value)
    assert text in msg and "\n" not in msg
    assert "; " in msg  # the fix follows the reason


def test_srkl_alpha_reports_the_users_value_not_one_minus_alpha():
    with pytest.raises(ConfigError, match=r"loss\.alpha=1\.5 ") as e:
        DistillLossConfig(divergence="srkl", alpha=1.5)
    assert "-0.5" not in str(e.value)


def test_defaults_and_edges_are_accepted():
    OptimConfig(), OptimConfig(min_lr_ratio=0.0, warmup_steps=0, weight_decay=0.0, beta1=0.0)
    DistillLossConfig(), DistillLossConfig(kd_weight=0.0, ce_weight=1.0), DistillLossConfig(divergence="jsd", beta=1.0)
    DistillLossConfig(divergence="fkl", alpha=1.0)  # alpha is unused outside skl / srkl
    DistiLLMConfig(), DistiLLM2Config(beta=2.0), SKDConfig(student_temperature=0.0), RouterConfig(capacity_factor=1.25)
    ModelConfig.preset("student-moe")


def test_zero_lr_warns_once():
    with pytest.warns(UserWarning, match=r"model\.init_args\.optim\.lr=0: the weights will not change"):
        OptimConfig(lr=0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OptimConfig(lr=0.0)  # the second time: silent


def _trainer(**hp):
    base = dict(mode="packed", seq_len=32, prompt_len=8, response_len=8)
    return types.SimpleNamespace(datamodule=types.SimpleNamespace(hparams=types.SimpleNamespace(**{**base, **hp})))


def test_integer_budget_covering_the_sequence_warns_once():
    policy = build_policy(CacheConfig(policy="streaming_llm", budget=64), ModelConfig())
    with pytest.warns(UserWarning, match=r"cache\.budget=64 tokens is >= the data's longest sequence \(32 tokens\)"):
        check_cache_budget(_trainer(), policy)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_cache_budget(_trainer(), policy)  # once only
        check_cache_budget(_trainer(seq_len=128), policy)  # a budget below the sequence: no warning
        check_cache_budget(_trainer(), build_policy(CacheConfig(policy="streaming_llm", budget=0.5), ModelConfig()))


def test_teacher_positions_name_the_teacher():
    with pytest.raises(ConfigError, match=r"exceed the teacher's max_seq_len=16; .*train a teacher with a longer"):
        check_positions(_trainer(), 16, "teacher")
    with pytest.raises(ConfigError, match=r"raise the student's max_seq_len \(model\.init_args\.student\.max_seq_len\)"):
        check_positions(_trainer(), 16, "student", "model.init_args.student.max_seq_len")


@pytest.mark.parametrize("row,text", [({"text": None}, "is null (missing)"), ({"text": 42}, "holds '42' of type int, not text")])
def test_text_column_must_hold_text(tmp_path, row, text):
    import json

    from pikv_train.data.datamodule import TextDataModule

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    dm = TextDataModule(path=str(path), seq_len=4, batch_size=1)
    with pytest.raises(DataError, match=r"data\.text_field='text': row 1 \(0-based\) of .* " + text.replace("(", r"\(").replace(")", r"\)")):
        dm.load_rows()


@pytest.mark.parametrize("kw,key", [(dict(batch_size=0), "data.batch_size=0"), (dict(seq_len=0), "data.seq_len=0"),
                                    (dict(prompt_len=0), "data.prompt_len=0"), (dict(response_len=-1), "data.response_len=-1"),
                                    (dict(val_fraction=1.0), "data.val_fraction must be in [0, 1)")])
def test_data_sizes(kw, key):
    from pikv_train.data.datamodule import TextDataModule

    with pytest.raises(ConfigError) as e:
        TextDataModule(**kw)
    assert key in str(e.value)


def test_warnings_reach_the_wandb_summary():
    from pikv_train.tasks.base import TaskBase

    with pytest.warns(UserWarning, match="unintended setting"):
        errors.warn_once("an unintended setting")
    run = types.SimpleNamespace(summary={})
    TaskBase.on_fit_start(types.SimpleNamespace(global_rank=0, loggers=[types.SimpleNamespace(experiment=run)]))
    assert run.summary["config/warnings"] == ["an unintended setting"]
