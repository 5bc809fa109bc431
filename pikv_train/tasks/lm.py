"""LanguageModelTask: next-token cross-entropy. Trains teachers and the CE-only student baseline."""

from __future__ import annotations

from typing import Literal

import torch

from pikv_train.cache.config import CacheConfig, build_policy
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.distill import chunked_cross_entropy
from pikv_train.models.config import ModelConfig
from pikv_train.models.build import build_decoder
from pikv_train.models.lora import check_with_cache
from pikv_train.models.decoder import Decoder
from pikv_train.tasks.base import OptimConfig, TaskBase, as_config, build_optimizer, total_training_steps
from pikv_train.tasks.checks import check_cache_budget, check_positions, check_vocab


class LanguageModelTask(TaskBase):
    """Cross-entropy language modelling on ``loss_mask`` tokens (+ router losses for MoE models).

    Args:
        model: the decoder architecture (dense for teachers, ``moe`` set for a PiKV student).
        optim: optimizer and schedule.
        chunk_size: tokens per chunk of the fused LM head + cross-entropy (no full (N, V) logits).
        cache: the KV cache policy the model trains and validates under (default: full attention).
        kv_sharding: expert-sharded KV placement (MoE models; default: off).
        init_from: start from this pikv_train checkpoint's weights (same architecture).
        nonfinite: on a NaN/inf loss or gradient, ``stop`` (raise, naming the step and loss terms; the last
            good checkpoint stays as it is) or ``skip`` the optimizer step.
        activation_checkpointing: recompute each decoder block in the backward instead of storing its
            activations (less memory, about a third more compute).
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        optim: OptimConfig = OptimConfig(),
        chunk_size: int = 2048,
        cache: CacheConfig = CacheConfig(),
        kv_sharding: ShardingConfig = ShardingConfig(),
        init_from: str | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.nonfinite = nonfinite
        self.model = build_decoder(as_config(ModelConfig, model), init_from)
        self.model.activation_checkpointing = activation_checkpointing
        # A LoRA checkpoint holds the trainable parameters only (the base comes from init_from / hf_path).
        self.strict_loading = self.model.cfg.lora is None
        self.model.set_kv_sharding(build_sharding(as_config(ShardingConfig, kv_sharding), self.model.cfg))
        cache_cfg = as_config(CacheConfig, cache)
        check_with_cache(self.model.cfg.lora, getattr(cache_cfg.compressor, "name", "none"), self.model.cfg.qkv_bias)
        self.model.set_cache_policy(build_policy(cache_cfg, self.model.cfg))
        self.optim_cfg = as_config(OptimConfig, optim)
        self.chunk_size = chunk_size

    @property
    def student_model(self) -> Decoder:
        return self.model

    def setup(self, stage: str) -> None:
        self.preflight()

    def preflight(self) -> None:
        """Checks that need the data module; the CLI runs them before anything is written to disk."""
        check_vocab(self.trainer, self.model.cfg.vocab_size, "model")
        check_positions(self.trainer, self.model.cfg.max_seq_len, "model", "model.init_args.model.max_seq_len")
        check_cache_budget(self.trainer, self.model.cache_policy)

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)

    def _nll(self, batch) -> tuple[torch.Tensor, torch.Tensor, object]:
        out = self.model(batch["input_ids"])
        h = out.hidden.flatten(0, 1)  # (N, d)
        mask = batch["loss_mask"].flatten().bool()
        nll_sum = chunked_cross_entropy(
            h, self.model.head_weight, batch["targets"].flatten(), mask=mask, chunk_size=self.chunk_size, reduction="sum"
        )
        return nll_sum, mask.sum(), out

    def training_step(self, batch, batch_idx):
        nll_sum, n_tok, out = self._nll(batch)
        ce = nll_sum / n_tok.clamp_min(1)
        router_loss = self.log_routing(out) + self.log_hook_stats(out)
        self.check_finite({"train/ce": ce.detach(), "router/loss": router_loss.detach()})
        self.log_dict({"train/loss": (ce + router_loss).detach(), "train/ce": ce.detach()}, on_step=True, prog_bar=True)
        return self.to_backward(nll_sum, n_tok, per_batch=router_loss)

    def validation_step(self, batch, batch_idx):
        nll_sum, n_tok, _ = self._nll(batch)
        self.log_val_nll(nll_sum.detach(), n_tok)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optim_cfg, total_training_steps(self.trainer))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # A plain-dict copy of the architecture: teachers are rebuilt from it without unpickling classes.
        checkpoint["pikv_model_config"] = self.model.cfg.to_dict()
        checkpoint["pikv_task"] = "lm"
