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
    assert ckpt["pikv_lora"] == {"merged": False, "base": {"init_from": str(tmp / "base.ckpt"), "hf_path": None}}
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
