"""Building a trainable decoder from its config: the architecture, its starting weights and its adapters, in one
place for both tasks (``LanguageModelTask.model``, ``DistillationTask.student``), and reading one back from a
checkpoint (LoRA checkpoints hold only the trainable parameters plus a reference to the base).

Order: the architecture (:class:`Decoder`; with ``hf_path`` the folder's, see :func:`resolve_config`), then the
weights it starts from (a pikv_train checkpoint: ``student_init`` / ``init_from``, or the Hugging Face folder), then
sparse upcycling (``upcycle``: the dense FFNs become MoE layers of copies), then LoRA adapters (they wrap the loaded
base weights, which freeze).

The decoder returned carries the *resolved* config (``hf_path`` and ``upcycle`` null, the folder's architecture, the
upcycled ``moe``): it is what checkpoints store (``pikv_model_config``), so they reload as plain decoders, without the
folder and without upcycling again.
"""

from __future__ import annotations

from dataclasses import replace

from pikv_train.errors import ConfigError
from pikv_train.models.config import ModelConfig
from pikv_train.models.decoder import Decoder

HOOK_PREFIXES = ("cache_policy.", "kv_sharding.")


def build_decoder(cfg: ModelConfig, init_from: str | None = None) -> Decoder:
    """The decoder of ``cfg`` with the weights of ``init_from`` (a pikv_train checkpoint) and ``cfg.lora``'s
    adapters; ``model.lora_base`` records where the frozen base came from (checkpoints refer to it)."""
    if cfg.lora is not None and not init_from and not getattr(cfg, "hf_path", None):
        raise ConfigError("lora freezes the base weights, so they must be pretrained: set student_init (init_from for "
                          "the language-model task) to a pikv_train checkpoint, or the model's hf_path")
    hf_path = getattr(cfg, "hf_path", None)
    if init_from and hf_path:
        raise ConfigError(f"the model has both hf_path ({hf_path!r}) and a pikv_train checkpoint to start from "
                          f"(student_init / init_from: {init_from!r}); set one of them")
    if cfg.upcycle is not None and cfg.lora is not None:
        raise ConfigError("upcycle with lora: LoRA checkpoints refer to their frozen base, and an upcycled base (a fresh "
                          "router, noisy copies) cannot be rebuilt from it; drop lora (upcycled students train fully)")
    base_cfg = _with_folder(cfg)
    model = Decoder(base_cfg)
    if hf_path:
        from pikv_train.hf.load import load_hf_weights

        load_hf_weights(model, hf_path)
    if init_from:
        from pikv_train.tasks.teacher import init_student_from

        init_student_from(model, init_from)
    if cfg.upcycle is not None:
        from pikv_train.models.upcycle import upcycle

        upcycle(model)
    if cfg.lora is not None:
        from pikv_train.models.lora import apply_lora

        checksum = base_checksum(model)  # before the adapters: the frozen base only
        apply_lora(model, cfg.lora)
        model.lora_base = {"init_from": _resolved(init_from), "hf_path": _resolved(hf_path), "checksum": checksum}
    return model


def _resolved(path) -> str | None:
    """An absolute path (a checkpoint's base reference must not depend on the working directory)."""
    from pathlib import Path

    return str(Path(path).expanduser().resolve()) if path else None


def base_checksum(model) -> float:
    """A fingerprint of the weights (sum of |w| in float64): a LoRA checkpoint records its base's, so adapters are
    never merged into a base that changed since training."""
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def same_base(a: dict | None, b: dict | None) -> bool:
    """Whether two LoRA base references name the same paths and weights (checksums equal up to float64 rounding)."""
    if a is None or b is None:
        return a is b
    ca, cb = a.get("checksum"), b.get("checksum")
    paths = all(a.get(k) == b.get(k) for k in ("init_from", "hf_path"))
    return paths and (ca is None or cb is None or abs(ca - cb) <= 1e-9 * max(abs(ca), 1.0))


def _with_folder(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the Hugging Face folder's architecture when ``hf_path`` is set (``hf_path`` null after)."""
    if not getattr(cfg, "hf_path", None):
        return cfg
    from pikv_train.hf.load import hf_model_config

    return hf_model_config(cfg)


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """The architecture :func:`build_decoder` gives ``cfg`` without building it (reads only the folder's config.json):
    the folder's fields for ``hf_path``, the MoE of ``upcycle``; both null after."""
    cfg = _with_folder(cfg)
    if cfg.upcycle is None:
        return cfg
    from pikv_train.models.upcycle import upcycled_config

    return upcycled_config(cfg)


def plain_state(ckpt: dict, prefix: str) -> dict:
    """The decoder weights stored in a pikv_train checkpoint under ``prefix`` (``model.`` / ``student.``), as a model
    without adapters loads them: a LoRA checkpoint's adapters merged into the base it refers to (hook parameters, e.g.
    DuoAttention gates, kept under their names)."""
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    info = ckpt.get("pikv_lora")
    if not info or info.get("merged"):
        return state
    from pikv_train.models.lora import merge_lora

    cfg = ModelConfig.from_dict(ckpt["pikv_model_config"])
    base = info.get("base") or {}
    if base.get("hf_path") and hasattr(cfg, "hf_path"):
        cfg = replace(cfg, hf_path=base["hf_path"])
    model = build_decoder(cfg, base.get("init_from"))  # the base, with fresh adapters
    if not same_base({**base, "init_from": None, "hf_path": None},
                     {**model.lora_base, "init_from": None, "hf_path": None}):
        raise ConfigError(f"the base of this LoRA checkpoint ({base.get('init_from') or base.get('hf_path')}) has other "
                          "weights than when the adapters were trained; restore that base, or use a checkpoint written "
                          "with lora.save_merged true")
    hooks = {k: v for k, v in state.items() if k.startswith(HOOK_PREFIXES)}
    _, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in hooks}, strict=False)
    if unexpected:
        raise ConfigError(f"the LoRA checkpoint's weights {unexpected[:3]} do not fit its base "
                          f"{base.get('init_from') or base.get('hf_path')}; the base changed since training: restore it")
    merge_lora(model)
    return {**model.state_dict(), **hooks}


def lora_checkpoint_state(model: Decoder, state: dict, prefix: str) -> dict:
    """What a LoRA run's checkpoint records (``checkpoint["pikv_lora"]``), after thinning ``state`` (the checkpoint's
    state_dict, keys ``prefix + name``) in place: without ``save_merged``, the frozen base parameters are dropped (the
    checkpoint refers to the base instead); with it, the adapters are merged into the weights and dropped."""
    from pikv_train.models.lora import LoRALinear

    lora = model.cfg.lora
    if lora.save_merged:
        for name, mod in model.named_modules():
            if isinstance(mod, LoRALinear):
                state[f"{prefix}{name}.weight"] = mod.merged_weight().detach().clone()
                for p in ("lora_A", "lora_B"):
                    state.pop(f"{prefix}{name}.{p}", None)
        return {"merged": True}
    for name, p in model.named_parameters():
        if not p.requires_grad and not name.startswith(HOOK_PREFIXES):
            state.pop(prefix + name, None)
    return {"merged": False, "base": dict(model.lora_base)}
