"""The model card (``README.md``) of an exported student: what it is, how it was trained, on what, from which teacher,
under which KV cache, and the validation figures its run recorded ("not recorded" when none: no number is made up).

The card is Hugging Face's format: YAML front matter (library, pipeline, tags) then markdown sections.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass

import yaml

from pikv_train.hf.run_info import Figure

NOT_RECORDED = "not recorded"


def plain(value):
    """Hyper-parameters as plain YAML/JSON data: dataclasses and mappings to dicts, tuples to lists."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in dict(value).items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def describe_teacher(task: str | None, hp: dict) -> str:
    """One sentence on where the student's knowledge came from, from the task's hyper-parameters."""
    if task == "lm":
        return "None: trained as a language model (cross-entropy on the data's tokens)."
    t = hp.get("teacher") or {}
    loss = hp.get("loss") or {}
    how = f"objective `{hp.get('objective', 'kd')}`"
    if loss.get("divergence"):
        how += f", divergence `{loss['divergence']}`"
    if t.get("student_itself"):
        who = ("The student itself without its cache compression (KV-Distill: the student's weights stayed frozen "
               "and only the cache's trainable parts learned)")
    elif t.get("hf_path"):
        who = f"The Hugging Face model `{t['hf_path']}`"
    elif t.get("checkpoint"):
        who = f"The pikv_train checkpoint `{t['checkpoint']}`"
    else:
        return NOT_RECORDED.capitalize() + "."
    init = f"; the student started from `{hp['student_init']}`" if hp.get("student_init") else ""
    return f"{who} ({how}){init}."


def describe_data(dm: dict | None) -> list[str]:
    """Bullet lines of the data settings (``data:`` of the run)."""
    if not dm:
        return [NOT_RECORDED]
    source = f"`{dm['path']}`" if dm.get("path") else "pikv_train's embedded corpus (built in)"
    if dm.get("max_documents"):
        source += f", first {dm['max_documents']} documents"
    lines = [f"source: {source}", f"tokenizer: `{dm.get('tokenizer', 'byte')}`"]
    mode = dm.get("mode", "packed")
    if mode == "prompts":
        lines.append(f"mode: prompts (prompt_len {dm.get('prompt_len')}, response_len {dm.get('response_len')})")
    else:
        lines.append(f"mode: {mode}, sequences of {dm.get('seq_len')} tokens")
    lines.append(f"batch size: {dm.get('batch_size')}; validation split: {dm.get('val_fraction')} of the documents "
                 f"(split seed {dm.get('split_seed')})")
    return lines


def describe_cache(cache: dict | None, sharding: dict | None, state: str | None, folder: str) -> list[str]:
    """Bullet lines of the KV cache the student trained under (``pikv_cache.json``)."""
    if cache is None:
        lines = ["policy: full attention (no eviction, no compression)"]
    else:
        comp = (cache.get("compressor") or {}).get("name", "none")
        b, ref = float(cache.get("budget", 1.0)), cache.get("reference_len") or "max_seq_len"
        budget = f"{b:g} of a {ref}-token reference length" if b <= 1 else f"{b:g} tokens"
        lines = [f"policy: `{cache.get('policy')}`, budget {budget} per layer and kv-head",
                 f"compressor: `{comp}`"]
    if sharding:
        shards = f"{sharding['n_shards']} shards" if sharding.get("n_shards") else "one shard per expert"
        lines.append(f"expert-sharded KV: {shards}, read `{sharding.get('read_mode')}`, "
                     f"{sharding.get('n_sink')} sink tokens, window {sharding.get('window')}")
    else:
        lines.append("expert-sharded KV: off")
    if state:
        lines.append(f"learned cache parameters: `{state}`")
    comp = ((cache or {}).get("compressor") or {}).get("name", "none")
    why_not = ("sharded KV reads through pikv_train's routers" if sharding else _not_from_kv().get(comp))
    lines.append(f"settings: `pikv_cache.json`; `pikv_train.hf.PiKVCache.from_pretrained(\"{folder}\")` rebuilds this "
                 "cache for `generate()` (model loaded with `attn_implementation=\"pikv\"`)"
                 + (f", except that this one {why_not}: decode with pikv_train's own generation" if why_not else ""))
    return lines


def _not_from_kv() -> dict:
    """Compressors a transformers cache cannot hold, with the reason (PiKVCache refuses them)."""
    try:
        from pikv_train.hf.cache import NOT_FROM_KV
    except ImportError:  # pragma: no cover - an install without transformers
        return {}
    return NOT_FROM_KV


def architecture_lines(arch_class: str, cfg, n_params: int) -> list[str]:
    """Bullet lines of the architecture: family, parameters, shapes."""
    lines = [f"`{arch_class}` (exact mapping: the exported model's logits equal the student's)",
             f"parameters: {n_params:,}"]
    if cfg.moe is not None:
        m, r = cfg.moe, cfg.moe.router
        expert = 3 * cfg.d_model * m.d_expert
        idle = cfg.n_layer * (m.n_experts - r.top_k) * expert
        lines[-1] += f" ({n_params - idle:,} used per token)"
        lines.append(f"mixture of experts: {m.n_experts} experts of width {m.d_expert}, top-{r.top_k} softmax routing "
                     f"(router `{r.name}`, weights {'renormalised' if r.normalize_weights else 'raw'})"
                     + (", one always-on shared expert" if m.shared_expert else ""))
    else:
        lines.append(f"dense SwiGLU feed-forward of width {cfg.d_ff}")
    lines += [f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} query heads, {cfg.n_kv_head} key/value heads "
              f"(head dim {cfg.head_dim}), RoPE base {cfg.rope_base:g}",
              f"vocabulary {cfg.vocab_size}, up to {cfg.max_seq_len} positions, "
              f"{'tied' if cfg.tie_embeddings else 'separate'} input/output embeddings"]
    return lines


_MEANING = {
    "val/loss": "the model's cross-entropy on the validation split, under its training cache",
    "val/ppl": "exp(val/loss)",
    "val/kd": "forward KL from the teacher to the student",
    "val/agreement": "share of tokens where the student's top-1 prediction is the teacher's",
}


def figures_table(figures: list[Figure], run_dir: str) -> list[str]:
    if not figures:
        return [f"{NOT_RECORDED.capitalize()}: the checkpoint holds no monitored score and no metrics file "
                f"(metrics.csv or W&B run file) was found in the run folder `{run_dir}`."]
    rows = [f"Last values logged up to the checkpoint's step (sources relative to the run folder `{run_dir}`):", "",
            "| metric | value | logged at step | source |", "|---|---|---|---|"]
    rows += [f"| {f.name} | {f.value:.6g} | {'' if f.step is None else f.step} | {f.source} |" for f in figures]
    meant = [f"`{k}`: {v}" for k, v in _MEANING.items() if any(f.name.endswith(k) for f in figures)]
    return rows + (["", "; ".join(meant) + "."] if meant else [])


def model_card(*, name: str, folder: str, arch_class: str, cfg, n_params: int, task: str | None, ckpt_path: str,
               global_step: int | None, recipe: str, recipe_source: str, hp: dict, data: dict | None,
               cache: dict | None, sharding: dict | None, state: str | None, figures: list[Figure],
               run_dir: str = "") -> str:
    """The card's markdown text.

    Args:
        name: the model's name (the export folder's name); folder: how users name the folder in code.
        arch_class: the transformers class (``MixtralForCausalLM``); cfg: our ModelConfig; n_params: its parameters.
        recipe: the run's resolved config as YAML text; recipe_source: where it came from.
        hp: the task's hyper-parameters (plain data); data: the data module's.
        cache / sharding / state: the contents of ``pikv_cache.json``; figures: :func:`validation_figures`, found in
            the run folder ``run_dir``.
    """
    tags = ["pikv_train"] + (["distillation"] if task == "distill" else []) + ["kv-cache"]
    tags += ["mixture-of-experts"] if cfg.moe is not None else []
    front = yaml.safe_dump({"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": tags + [arch_class.replace("ForCausalLM", "").lower()]}, sort_keys=False)
    kind = "student distilled" if task == "distill" else "language model trained"
    out = ["---", front.rstrip(), "---", "", f"# {name}", "",
           f"A PiKV {kind} with pikv_train, exported from `{ckpt_path}`"
           f"{'' if global_step is None else f' (step {global_step})'} by `python -m pikv_train export`.", "",
           "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           f"tok = AutoTokenizer.from_pretrained(\"{folder}\")",
           f"model = AutoModelForCausalLM.from_pretrained(\"{folder}\")",
           "batch = tok([\"The\"], return_tensors=\"pt\", add_special_tokens=False)  # trained without BOS",
           "print(tok.decode(model.generate(**batch, max_new_tokens=40)[0]))", "```", "",
           "Plain transformers decodes with a full KV cache. To decode with the cache the model was trained under "
           "(below): `import pikv_train.hf`, load with `attn_implementation=\"pikv\"` and pass "
           f"`cache=pikv_train.hf.PiKVCache.from_pretrained(\"{folder}\")` to `generate`.", "",
           "## Architecture", ""]
    out += [f"- {ln}" for ln in architecture_lines(arch_class, cfg, n_params)]
    out += ["", "## Teacher", "", describe_teacher(task, hp), "", "## Data", ""]
    out += [f"- {ln}" for ln in describe_data(data)]
    out += ["", "## KV cache it was trained under", ""]
    out += [f"- {ln}" for ln in describe_cache(cache, sharding, state, folder)]
    out += ["", "## Validation", ""] + figures_table(figures, run_dir)
    out += ["", "## Training recipe", "", f"The run's resolved configuration ({recipe_source}):", "", "```yaml",
            recipe.rstrip(), "```", ""]
    return "\n".join(out)


def recipe_from_hparams(hp: dict, data: dict | None) -> str:
    """YAML of the task and data settings stored in the checkpoint (when the run's config.yaml is not found)."""
    hp = plain(hp)
    cls = hp.get("_class_path")
    hp = {k: v for k, v in hp.items() if not k.startswith("_")}
    model = {"class_path": cls, "init_args": hp} if cls else hp
    doc = {"model": model}
    if data:
        doc["data"] = {k: v for k, v in plain(data).items() if not k.startswith("_")}
    return yaml.safe_dump(json.loads(json.dumps(doc, default=str)), sort_keys=False)
