"""Catalog cases for bad setting *values* (issue 12, items 1-3): every config section's ranges, each refused in
parsing or preflight (nothing written), with one line naming the setting by its config path, the value, the
valid range and the fix. See ``_extra_cases`` in tests/test_bad_input_catalog.py for the contract."""

from __future__ import annotations

import json

M = "--model.init_args."


def _lm(*args, expected):
    return lambda tmp, recipe, ckpt, distill: (["fit", "--config", str(recipe), *args], expected)


def _kd(*args, expected):
    return lambda tmp, recipe, ckpt, distill: (["fit", "--config", str(distill(str(ckpt))), *args], expected)


def _prompts(objective, *args, expected):
    prompts = ("--data.mode", "prompts", "--data.prompt_len", "8", "--data.response_len", "8")
    return _kd(M + "objective", objective, *prompts, *args, expected=expected)


def _rows(name, rows, expected):
    def build(tmp, recipe, ckpt, distill):
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ["fit", "--config", str(recipe), "--data.path", str(path)], expected
    return build


_TEXT = [{"text": "a line of text, long enough to pack " * 4}] * 3

CASES = {
    # optimizer and schedule
    "optim_negative_lr": _lm(M + "optim.lr=-1e-3", expected="model.init_args.optim.lr=-0.001 is invalid"),
    "optim_beta1_above_one": _lm(M + "optim.beta1", "1.5", expected="model.init_args.optim.beta1=1.5 is invalid: must lie in [0, 1)"),
    "optim_beta2_one": _lm(M + "optim.beta2", "1.0", expected="model.init_args.optim.beta2=1.0 is invalid: must lie in [0, 1)"),
    "optim_negative_weight_decay": _lm(M + "optim.weight_decay", "-0.1", expected="model.init_args.optim.weight_decay=-0.1"),
    "optim_negative_warmup": _lm(M + "optim.warmup_steps", "-5", expected="model.init_args.optim.warmup_steps=-5 is invalid: must be >= 0"),
    "optim_min_lr_ratio_above_one": _lm(M + "optim.min_lr_ratio", "5", expected="model.init_args.optim.min_lr_ratio=5.0 is invalid: must lie in [0, 1]"),
    # distillation loss
    "loss_zero_temperature": _kd(M + "loss.temperature", "0", expected="model.init_args.loss.temperature=0.0 is invalid: must be > 0"),
    "loss_jsd_beta_out_of_range": _kd(M + "loss.divergence", "jsd", M + "loss.beta", "1.5",
                                      expected="model.init_args.loss.beta=1.5 is invalid: must lie in [0, 1]"),
    "loss_srkl_alpha_reported_as_given": _kd(M + "loss.divergence", "srkl", M + "loss.alpha", "2",
                                             expected="model.init_args.loss.alpha=2.0 is invalid: must lie in [0, 1)"),
    "loss_skl_alpha_one_no_signal": _kd(M + "loss.divergence", "skl", M + "loss.alpha", "1.0",
                                        expected="model.init_args.loss.alpha=1.0 is invalid: must be < 1"),
    "loss_no_kd_no_ce": _kd(M + "loss.kd_weight", "0", M + "loss.ce_weight", "0",
                            expected="kd_weight and model.init_args.loss.ce_weight are both 0"),
    "loss_chunk_size_zero": _kd(M + "loss.chunk_size", "0", expected="model.init_args.loss.chunk_size=0 is invalid: must be >= 1"),
    # model architecture
    "model_zero_heads": _lm(M + "model.n_head", "0", expected="model.init_args.model.n_head=0 is invalid"),
    "model_zero_layers": _lm(M + "model.n_layer", "0", expected=".n_layer=0 is invalid: must be >= 1"),
    "model_zero_vocab": _lm(M + "model.vocab_size", "0", expected=".vocab_size=0 is invalid: must be >= 1"),
    "model_zero_positions": _lm(M + "model.max_seq_len", "0", expected=".max_seq_len=0 is invalid: must be >= 1"),
    "model_d_model_not_divisible": _lm(M + "model.d_model", "33", expected=".d_model=33 is invalid: must be divisible by n_head=2"),
    "model_kv_heads_not_dividing": _kd(M + "student.n_kv_head", "3", M + "student.n_head", "4", M + "student.d_model", "32",
                                       expected=".n_kv_head=3 is invalid: must divide n_head=4"),
    # router
    "router_top_k_zero": _kd(M + "student.moe.router.top_k", "0",
                             expected="model.init_args.student.moe.router.top_k=0 is invalid: must be >= 1; set model.init_args.student.moe.router.top_k to at least 1"),
    "router_zero_experts": _kd(M + "student.moe.n_experts", "0", expected="moe.n_experts=0 is invalid: must be >= 1"),
    "router_capacity_factor_zero": _kd(M + "student.moe.router.capacity_factor", "0",
                                       expected="moe.router.capacity_factor=0.0 is invalid: must be > 0"),
    # cache
    "cache_kv_bits": _lm(M + "cache.policy", "flexgen", M + "cache.kv_bits", "3",
                         expected="model.init_args.cache.kv_bits=3 is invalid: choose 0 (off), 4 or 8"),
    "cache_ada_alpha": _lm(M + "cache.policy", "ada_kv", M + "cache.budget", "0.5", M + "cache.ada_alpha", "2",
                           expected="model.init_args.cache.ada_alpha=2.0 is invalid: must lie in [0, 1]"),
    "cache_chunk_size_zero": _lm(M + "cache.policy", "h2o", M + "cache.budget", "0.5", M + "cache.chunk_size", "0",
                                 expected="model.init_args.cache.chunk_size=0 is invalid: must be >= 1"),
    # data
    "data_batch_size_zero": _lm("--data.batch_size", "0", expected="data.batch_size=0 is invalid: must be >= 1"),
    "data_seq_len_zero": _lm("--data.seq_len", "0", expected="data.seq_len=0 is invalid: must be >= 1"),
    "data_prompt_len_zero": _lm("--data.mode", "prompts", "--data.prompt_len", "0", expected="data.prompt_len=0 is invalid"),
    "data_response_len_zero": _lm("--data.mode", "prompts", "--data.response_len", "0", expected="data.response_len=0 is invalid"),
    "data_val_fraction_one": _lm("--data.val_fraction", "1.0", expected="data.val_fraction must be in [0, 1), got 1.0"),
    "data_null_text": _rows("nulls", _TEXT + [{"text": None}], "data.text_field='text': row 3 (0-based) of"),
    "data_number_text": _rows("numbers", _TEXT[:1] + [{"text": 42}] + _TEXT, "row 1 (0-based) of"),
    # objectives
    "distillm_alpha_out_of_range": _prompts("distillm", M + "distillm.alpha", "1.5",
                                            expected="model.init_args.distillm.alpha=1.5 is invalid: must lie in [0, 1)"),
    "distillm_phi_step_out_of_range": _prompts("distillm", M + "distillm.phi_step", "2",
                                               expected="model.init_args.distillm.phi_step=2.0 is invalid: must lie in [0, 1]"),
    "distillm_top_p_zero": _prompts("distillm", M + "distillm.top_p", "0", expected="model.init_args.distillm.top_p=0.0 is invalid"),
    "distillm2_alpha2_one": _prompts("distillm2", M + "distillm2.alpha2", "1.0",
                                     expected="model.init_args.distillm2.alpha2=1.0 is invalid: must be < 1"),
    "distillm2_beta_out_of_range": _prompts("distillm2", M + "distillm2.beta", "3",
                                            expected="model.init_args.distillm2.beta=3.0 is invalid: must lie in [0, 2]"),
    "distillm2_negative_temperature": _prompts("distillm2", M + "distillm2.temperature", "-1",
                                               expected="model.init_args.distillm2.temperature=-1.0 is invalid: must be >= 0"),
    "skd_gamma_zero": _prompts("skd", M + "skd.gamma", "0", expected="model.init_args.skd.gamma=0 is invalid: must be >= 1"),
    "skd_top_k_zero": _prompts("skd", M + "skd.top_k", "0", expected="model.init_args.skd.top_k=0 is invalid: must be >= 1"),
    "skd_top_p_above_one": _prompts("skd", M + "skd.teacher_top_p", "1.5",
                                    expected="model.init_args.skd.teacher_top_p=1.5 is invalid: must lie in (0, 1]"),
    # teacher positions (the trained teacher has max_seq_len 128; the student is raised to 256 to reach it)
    "teacher_shorter_than_data": _kd(M + "student.max_seq_len", "256", "--data.seq_len", "200",
                                     expected="data sequences of 200 tokens exceed the teacher's max_seq_len=128"),
}
