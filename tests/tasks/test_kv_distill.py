"""KV-Distill (``cache.compressor: distillation``) with the student as its own teacher (``teacher.student_itself``):
decoding equals training, only the scorer and adapters train, the KL is the real one, bad settings are errors."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers import decode_tokenwise

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.compression import DistillationCompressor
from pikv_train.data import TextDataModule
from pikv_train.errors import ConfigError
from pikv_train.models import Decoder, ModelConfig
from pikv_train.tasks import DistillationTask, TeacherConfig

T = 48
COMP = dict(name="distillation", obs_window=6, distill_rank=4)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("chunk", [1, 4])
def test_kv_distill_decodes_as_it_trained_with_adapted_kept_tokens(chunk):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano-moe", n_head=4, n_kv_head=2, max_seq_len=T)
    model = Decoder(cfg)
    with torch.no_grad():
        for blk in model.blocks:  # peaky attention
            blk.attn.q_proj.weight.mul_(20.0)
            blk.attn.kv_proj.weight[: cfg.n_kv_head * cfg.head_dim].mul_(20.0)
    model.set_cache_policy(build_policy(CacheConfig(budget=0.5, chunk_size=chunk, compressor=COMP), cfg))
    pol = model.cache_policy
    assert isinstance(pol, DistillationCompressor)
    with torch.no_grad():
        for b in pol.compressor.lora_b:  # trained adapters: the kept tokens' keys/values differ from the base
            b.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    model.eval()
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        train = model.logits(model(x).hidden)
        cache = model.new_cache()
        dec = decode_tokenwise(model, cache, x, 7)
        for b in pol.compressor.lora_b:
            b.zero_()
        base_forms = model.logits(model(x).hidden)  # the same selection, kept tokens in their base form
    scale = float(train.abs().max())
    torch.testing.assert_close(dec, train, rtol=1e-4, atol=1e-4 * scale)
    assert float((base_forms - train).abs().max()) > 1e-3 * scale  # the adapters act on what is read
    w = pol.window(pol.budget_tokens())
    assert (cache.head_lengths(0) == pol.budget_tokens()).all()  # window + the best-scored kept tokens
    st = cache.store[0][0][0]
    assert len(st["kv"].kb) == w - 1 and len(st["kv"].ka) == len(st["pos"])  # base forms: what the next row reads


def _trainer(tmp_path, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=tmp_path)


def test_student_itself_trains_only_the_scorer_and_adapters(tmp_path):
    cfg = ModelConfig.preset("nano-moe", max_seq_len=64)
    task = DistillationTask(student=cfg, teacher=TeacherConfig(student_itself=True),
                            cache=CacheConfig(budget=0.5, compressor=COMP))
    before = {n: p.detach().clone() for n, p in task.student.named_parameters()}
    dm = TextDataModule(max_documents=8, seq_len=32, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, 4).fit(task, datamodule=dm)
    comp = task.student.cache_policy.compressor
    changed = {n for n, p in task.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("cache_policy.compressor.") for n in changed)  # the base is frozen
    assert any(".lora_b." in n for n in changed) and any(".scorer." in n for n in changed)
    # The teacher is the same student without compression: its loss against itself is zero, against the
    # compressed forward it is the KL the run minimised.
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x = batch["input_ids"]
    with torch.no_grad():
        t_hidden = task.teacher(x).hidden
        plain = task.student.eval()
        with plain.cache_off():
            torch.testing.assert_close(plain(x).hidden, t_hidden, rtol=0, atol=0)
        compressed = plain(x).hidden
    assert float((compressed - t_hidden).abs().max()) > 1e-4
    with torch.enable_grad():
        assert not task.teacher(x).hidden.requires_grad  # the teacher's forward builds no graph
    assert not task.teacher.head_weight.requires_grad  # nor does its head
    assert comp.window == 6  # min(obs_window, budget // 2): the storage reads base forms in the policy's window
    w_kv = task.student.blocks[0].attn.kv_proj.weight
    w_kv.requires_grad_(True)  # as a compressor leaving would (LoRA folds its factors back and unfreezes)
    before_kv = w_kv.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, 2).fit(task, datamodule=dm)
    assert not w_kv.requires_grad and torch.equal(w_kv, before_kv)  # frozen again before every step


@pytest.mark.parametrize("kw,match", [
    (dict(teacher=TeacherConfig(student_itself=True, checkpoint="x.ckpt")), "drop the other teacher setting"),
    (dict(teacher=TeacherConfig(student_itself=True), objective="distillm"), "works with objective kd"),
])
def test_student_itself_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        DistillationTask(student=ModelConfig.preset("nano-moe"), cache=CacheConfig(budget=0.5, compressor=COMP), **kw)
    assert "\n" not in str(e.value)


def test_student_itself_without_anything_trainable_warns():
    with pytest.warns(UserWarning, match="nothing learns"):
        DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(student_itself=True),
                         cache=CacheConfig(policy="h2o", budget=0.5))
    with pytest.warns(UserWarning, match="the loss is zero"):
        DistillationTask(student=ModelConfig.preset("nano-moe"), teacher=TeacherConfig(student_itself=True))
