"""Evaluate checkpoints on a data split without Lightning: validation perplexity and teacher agreement.

Used by the results scripts in ``benchmarks/`` so every model in a table is measured by the same code
on the same tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pikv_train.distill import chunked_distill_loss
from pikv_train.models.config import ModelConfig
from pikv_train.models.decoder import Decoder
from pikv_train.tasks.teacher import read_checkpoint


def load_decoder(path: str | Path | dict) -> Decoder:
    """The trained decoder (teacher, or student) stored in a pikv_train checkpoint (its path, or the checkpoint
    dict :func:`~pikv_train.tasks.teacher.read_checkpoint` returned), in eval mode."""
    ckpt = path if isinstance(path, dict) else read_checkpoint(path)
    from dataclasses import replace

    from pikv_train.models.build import plain_state

    # LoRA adapters come back merged into the weights: the decoder is a plain one of the same architecture.
    cfg = replace(ModelConfig.from_dict(ckpt["pikv_model_config"]), lora=None)
    prefix = "model." if ckpt.get("pikv_task") == "lm" else "student."
    model = Decoder(cfg)
    state = plain_state(ckpt, prefix)
    # Learned hook parameters (DuoAttention gates) belong to the cache policy, not the architecture: callers
    # attach a policy and load them with load_hook_state() when they want them.
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(("cache_policy.", "kv_sharding."))})
    model.hook_state = {k: v for k, v in state.items() if k.startswith(("cache_policy.", "kv_sharding."))}
    return model.eval()


@torch.no_grad()
def evaluate(model: Decoder, loader, teacher: Decoder | None = None, max_batches: int | None = None) -> dict:
    """Token-weighted NLL / perplexity over ``loader`` (+ FKL and top-1 agreement with ``teacher``)."""
    nll = kd = agree = n = 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        h = model(batch["input_ids"]).hidden.flatten(0, 1)
        mask = batch["loss_mask"].flatten().bool()
        if teacher is not None:
            th = teacher(batch["input_ids"]).hidden.flatten(0, 1)
            _, parts = chunked_distill_loss(
                h, model.head_weight, th, teacher.head_weight, mask=mask, targets=batch["targets"].flatten(),
                ce_weight=1.0, reduction="sum", return_parts=True,
            )
            kd += float(parts["kd"])
            agree += float(parts["top1_agree"])
            nll += float(parts["ce"])
        else:
            from pikv_train.distill import chunked_cross_entropy

            nll += float(chunked_cross_entropy(h, model.head_weight, batch["targets"].flatten(), mask=mask, reduction="sum"))
        n += float(mask.sum())
    out = {"tokens": int(n), "nll": nll / max(n, 1), "ppl": math.exp(nll / max(n, 1))}
    if teacher is not None:
        out.update({"kl_to_teacher": kd / max(n, 1), "agreement": agree / max(n, 1)})
    return out
