"""LoRA in a real fit (SPEC §8): the frozen base does not move; the checkpoint holds only what is trainable plus a
reference to the base (or merged weights with save_merged); it reloads (load_decoder, export with adapters merged)
and resumes; a merged checkpoint cannot be resumed as adapters (one line)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers import assert_close_rel

from pikv_train.data import TextDataModule
from pikv_train.errors import ConfigError
from pikv_train.evaluate import load_decoder
from pikv_train.models import ModelConfig
from pikv_train.tasks import LanguageModelTask
from pikv_train.tasks.base import LORA_GROUP

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = {"rank": 4, "targets": ["attention", "ffn"], "lora_plus_ratio": 4.0}


def _fit(task, root, steps, ckpt_path=None):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, datamodule=TextDataModule(max_documents=8, seq_len=32, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def _task(base, **lora):
    # Settings as plain dicts, as the CLI passes them (hyper-parameters load with weights_only).
    cfg = ModelConfig.preset("nano-moe", max_seq_len=32, lora={**LORA, **lora}).to_dict()
    return LanguageModelTask(model=cfg, init_from=str(base), optim={"lr": 1e-2, "warmup_steps": 0}, cache={},
                             kv_sharding={})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = LanguageModelTask(model=ModelConfig.preset("nano-moe", max_seq_len=32).to_dict())
    _fit(base, tmp, 1).save_checkpoint(tmp / "base.ckpt")
    task = _task(tmp / "base.ckpt")
    trainer = _fit(task, tmp, 3)
    trainer.save_checkpoint(tmp / "lora.ckpt")
    return tmp, task, trainer


def _logits(model):
    x = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        return model.logits(model(x).hidden)


def test_the_frozen_base_does_not_move_and_lora_plus_has_its_group(runs):
    tmp, task, trainer = runs
    base = load_decoder(tmp / "base.ckpt")
    trained = dict(task.model.named_parameters())
    for name, p in base.named_parameters():
        if ".router." not in name:
            assert torch.equal(trained[name], p), name  # frozen
    assert any(float(m.abs().max()) > 0 for n, m in trained.items() if n.endswith("lora_B"))  # adapters trained
    groups = [g for g in trainer.optimizers[0].param_groups if g.get(LORA_GROUP)]
    assert len(groups) == 1 and groups[0]["initial_lr"] == pytest.approx(4e-2)


def test_checkpoint_holds_trainable_parameters_and_a_reference_and_reloads_merged(runs):
    tmp, task, _ = runs
    ckpt = torch.load(tmp / "lora.ckpt", map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert "model.embed.weight" not in keys and "model.blocks.0.attn.q_proj.weight" not in keys
    assert "model.blocks.0.attn.q_proj.lora_A" in keys and "model.blocks.0.ffn.experts.0.down.lora_B" in keys
    base = ckpt["pikv_lora"]["base"]
    assert ckpt["pikv_lora"]["merged"] is False and base["init_from"] == str((tmp / "base.ckpt").resolve())
    assert base["hf_path"] is None and base["checksum"] > 0
    reloaded = load_decoder(tmp / "lora.ckpt")  # the base from the reference, the adapters merged
    assert_close_rel(_logits(reloaded), _logits(task.model), 1e-5)
    assert float((_logits(reloaded) - _logits(load_decoder(tmp / "base.ckpt"))).abs().max()) > 1e-4


def test_export_merges_the_adapters(runs, tmp_path):
    import transformers

    from pikv_train.hf import export_checkpoint

    tmp, task, _ = runs
    export_checkpoint(tmp / "lora.ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_rel(hf(input_ids=x).logits, _logits(task.model), 1e-5)


def test_resume_continues_the_adapters_and_merged_checkpoints_are_refused(runs, tmp_path):
    tmp, task, _ = runs
    resumed = _task(tmp / "base.ckpt")
    trainer = _fit(resumed, tmp_path, 4, ckpt_path=str(tmp / "lora.ckpt"))
    assert trainer.global_step == 4
    merged_task = _task(tmp / "base.ckpt", save_merged=True)
    merged_task.model.load_state_dict(task.model.state_dict())
    t = _fit(merged_task, tmp_path, 0)
    t.save_checkpoint(tmp_path / "merged.ckpt")
    ckpt = torch.load(tmp_path / "merged.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["pikv_lora"] == {"merged": True} and not any("lora_" in k for k in ckpt["state_dict"])
    assert_close_rel(_logits(load_decoder(tmp_path / "merged.ckpt")), _logits(task.model), 1e-5)
    with pytest.raises(ConfigError, match="holds merged LoRA weights"):
        _fit(_task(tmp / "base.ckpt"), tmp_path, 5, ckpt_path=str(tmp_path / "merged.ckpt"))


def test_resume_restores_the_adapters_exactly(runs, tmp_path):
    tmp, task, _ = runs
    resumed = _task(tmp / "base.ckpt")
    _fit(resumed, tmp_path, 3, ckpt_path=str(tmp / "lora.ckpt"))  # restored at step 3: no step runs
    for (n, a), (_, b) in zip(task.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


def test_a_lora_checkpoint_is_refused_by_a_model_without_those_adapters_or_over_a_changed_base(runs, tmp_path):
    from pikv_train.models.build import plain_state

    tmp, _, _ = runs
    plain = LanguageModelTask(model=ModelConfig.preset("nano-moe", max_seq_len=32).to_dict(), cache={}, kv_sharding={})
    with pytest.raises(ConfigError, match="holds LoRA adapters"):
        _fit(plain, tmp_path, 4, ckpt_path=str(tmp / "lora.ckpt"))
    with pytest.raises(ConfigError, match="holds LoRA adapters"):
        _fit(_task(tmp / "base.ckpt", rank=2), tmp_path, 4, ckpt_path=str(tmp / "lora.ckpt"))
    ckpt = torch.load(tmp / "lora.ckpt", map_location="cpu", weights_only=False)
    ckpt["pikv_lora"]["base"]["checksum"] *= 1.01  # as if base.ckpt had been trained further since
    with pytest.raises(ConfigError, match="has other weights than when the adapters were trained"):
        plain_state(ckpt, "model.")


def test_merged_checkpoints_keep_the_kv_adapter_under_a_kv_compressor_and_load_for_evaluation(runs, tmp_path):
    tmp, task, _ = runs
    cfg = ModelConfig.preset("nano-moe", max_seq_len=32, lora={**LORA, "save_merged": True}).to_dict()
    merged_task = LanguageModelTask(model=cfg, init_from=str(tmp / "base.ckpt"), kv_sharding={}, optim={},
                                    cache={"compressor": {"name": "quantized", "bits": 4}})
    merged_task.model.load_state_dict(task.model.state_dict())
    _fit(merged_task, tmp_path, 0).save_checkpoint(tmp_path / "merged_kivi.ckpt")
    sd = torch.load(tmp_path / "merged_kivi.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    kv = task.model.blocks[0].attn.kv_proj
    assert torch.equal(sd["model.blocks.0.attn.kv_proj.weight"], kv.merged_weight())
    assert not torch.equal(kv.merged_weight(), kv.weight)  # the adapter is in there
    loaded = LanguageModelTask.load_from_checkpoint(tmp_path / "merged_kivi.ckpt")  # evaluation: not refused
    assert_close_rel(_logits(loaded.model), _logits(merged_task.model), 1e-5)


def test_lora_beside_a_low_rank_kv_compressor_or_a_self_teacher_is_refused(runs):
    from types import SimpleNamespace

    from pikv_train.callbacks.policy_switch import CachePolicySwitch
    from pikv_train.tasks import DistillationTask, TeacherConfig

    tmp, task, _ = runs
    switch = CachePolicySwitch(at_step=2, cache={"compressor": {"name": "svd", "rank": 0.5}})
    with pytest.raises(ConfigError, match="drop kv_proj from student.lora.targets"):
        switch.on_fit_start(SimpleNamespace(world_size=1), task)
    cfg = ModelConfig.preset("nano-moe", max_seq_len=32, lora={**LORA, "targets": ["q_proj"]}).to_dict()
    with pytest.raises(ConfigError, match="folds them into it"):
        LanguageModelTask(model=cfg, init_from=str(tmp / "base.ckpt"), cache={"compressor": {"name": "lora"}})
    with pytest.raises(ConfigError, match="student_itself=true freezes the student's own weights, adapters included"):
        DistillationTask(student=cfg, student_init=str(tmp / "base.ckpt"), teacher=TeacherConfig(student_itself=True),
                         cache={"compressor": {"name": "quantized", "bits": 4}})
