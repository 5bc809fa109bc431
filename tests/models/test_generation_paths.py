"""Every generation path decodes with the deployed cache (SPEC §7): ``generate()`` by default, ``predict``,
DistiLLM and DistiLLM-2 on-policy sampling and Speculative KD's student proposals.

Each test records the student logits computed while generating and compares them with the masked
parallel training forward of the generated sequence (equal), and with the full-attention forward
(different: a plain full cache, what these paths used before, would fail the first comparison).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pikv_train.cache import CacheConfig, build_policy
from pikv_train.cache.kv_cache import KVCache
from pikv_train.cache.sharding import ShardingConfig, build_sharding
from pikv_train.distill import DistiLLM2Config, DistiLLMConfig, SKDConfig
from pikv_train.distill.skd import speculative_kd_sample
from pikv_train.models import Decoder, ModelConfig, generate
from pikv_train.models.config import MoEConfig
from pikv_train.routing import RouterConfig
from pikv_train.tasks import DistillationTask, LanguageModelTask
from pikv_train.distill import DistillEnv, DistillLoss, DistillLossConfig, StepInfo

pytestmark = pytest.mark.usefixtures("one_thread")

# Token budgets (not fractions) well below the generated lengths (prompt 5-9 + 16-20 new tokens).
POLICIES = {
    "h2o": CacheConfig(policy="h2o", budget=10, chunk_size=4),
    "streaming_llm": CacheConfig(policy="streaming_llm", budget=10, n_sink=2),
}
SHARDING = ShardingConfig(enabled=True, n_sink=1, window=3)


def _cfg() -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64,
                       moe=MoEConfig(n_experts=4, d_expert=32, router=RouterConfig(top_k=2)))


def _peaky(model: Decoder, scale: float = 4.0) -> Decoder:
    """Scale the query and key projections so attention is peaky and the cache policy changes outputs."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.q_proj.weight.mul_(scale)
            w = blk.attn.kv_proj.weight  # rows: keys (H_kv * hd), then values
            w[: w.shape[0] // 2].mul_(scale)
    return model


def _student(policy: str | None = "h2o", sharding: bool = False) -> Decoder:
    torch.manual_seed(0)
    model = _peaky(Decoder(_cfg()))
    if sharding:
        model.set_kv_sharding(build_sharding(SHARDING, model.cfg))
    if policy is not None:
        model.set_cache_policy(build_policy(POLICIES[policy], model.cfg))
    return model.eval()


def _prompts(lengths=(6, 9, 5), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 258, (n,), generator=g) for n in lengths]


def _record_logits(model) -> list[torch.Tensor]:
    """Every (B, V) logits tensor the generation loop computes from ``model``, in call order."""
    log, plain = [], model.logits

    def logits(h):
        out = plain(h)
        log.append(out.detach().clone())
        return out

    model.logits = logits
    return log


def _references(model, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, V) logits of one unpadded sequence: the masked training forward, and full attention."""
    logits = type(model).logits.__get__(model)  # the plain LM head, even while recorded
    hooks = model.cache_policy, model.kv_sharding
    with torch.no_grad():
        masked = logits(model(seq[None]).hidden)[0]
        model.set_kv_sharding(None)
        model.set_cache_policy(None)
        full = logits(model(seq[None]).hidden)[0]
    model.set_kv_sharding(hooks[1])
    model.set_cache_policy(hooks[0])
    return masked, full


def _assert_deployed(model, seqs, prompt_lens, log) -> None:
    """Row i's recorded logits (one per call, from position prompt_len - 1 on) equal the masked forward of
    ``seqs[i]`` and differ from its full-attention forward."""
    gap = 0.0
    for i, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        got = torch.stack([x[i] for x in log])[: len(seq) - p + 1]  # (n, V) positions p-1 .. len-1
        masked, full = _references(model, seq)
        want = masked[p - 1 : p - 1 + len(got)]
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
        gap = max(gap, float((full[p - 1 : p - 1 + len(got)] - want).abs().max()) / scale)
    assert gap > 1e-2, "the policy does not change the logits here: the test would not see a full cache"


def _rows(gen, prompts):
    """Unpadded (prompt + generated) sequence per row of a Generation."""
    return [torch.cat([p, row[m]]) for p, row, m in zip(prompts, gen.tokens, gen.generated)]


# ------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("policy,sharding", [("h2o", False), ("streaming_llm", False), (None, True)])
def test_generate_defaults_to_the_deployed_cache(policy, sharding):
    model = _student(policy, sharding)
    prompts = _prompts()
    log = _record_logits(model)
    gen = generate(model, prompts, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert bool(gen.generated[:, gen.prompt_len:].all())
    _assert_deployed(model, _rows(gen, prompts), [len(p) for p in prompts], log)
    # An explicit factory still works (called with n_layer): KVCache decodes with full attention.
    log.clear()
    gen = generate(model, prompts, 20, temperature=1.0, generator=torch.Generator().manual_seed(1),
                   cache_factory=KVCache)
    for i, (seq, p) in enumerate(zip(_rows(gen, prompts), prompts)):
        got = torch.stack([x[i] for x in log])
        full = _references(model, seq)[1][len(p) - 1 :]
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4 * float(full.abs().max()))


# -------------------------------------------------------------------------------------------- predict
def test_predict_step_decodes_with_the_deployed_cache():
    torch.manual_seed(0)
    task = LanguageModelTask(model=_cfg(), cache=POLICIES["h2o"])
    _peaky(task.model).eval()
    task._trainer = SimpleNamespace(datamodule=None)  # no tokenizer: completions are space-joined ids
    task.predict_new_tokens = 16
    prompts = _prompts()
    log = _record_logits(task.model)
    rows = task.predict_step({"prompts": prompts}, 0)
    seqs = [torch.cat([p, torch.tensor([int(x) for x in r["completion"].split()])]) for p, r in zip(prompts, rows)]
    assert all(len(s) == len(p) + 16 for s, p in zip(seqs, prompts))
    _assert_deployed(task.model, seqs, [len(p) for p in prompts], log)
    # Greedy: each completion token is the argmax of the masked forward at the previous position.
    for s, p in zip(seqs, prompts):
        assert torch.equal(_references(task.model, s)[0][len(p) - 1 : -1].argmax(-1), s[len(p):])


# ----------------------------------------------------------------------------------- on-policy (DistiLLM)
def _distill_task(objective: str, **kw) -> DistillationTask:
    torch.manual_seed(0)
    task = DistillationTask(student=_cfg(), cache=POLICIES["streaming_llm"], objective=objective, **kw)
    _peaky(task.student).eval()
    torch.manual_seed(1)
    task.teacher = Decoder(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64)).eval()
    task.objective.bind(DistillEnv(student=task.student, teacher=task.teacher, vocab_size=258, response_len=16))
    return task


def test_distillm_fresh_generations_use_the_deployed_cache():
    task = _distill_task("distillm", distillm=DistiLLMConfig(init_phi=1.0, max_new_tokens=16))
    prompts = _prompts()
    log = _record_logits(task.student)
    batch, logs = task.objective.training_batch({"prompts": prompts}, StepInfo(0, 10))
    assert logs["kd/source_fresh"] == 1.0
    seqs = [torch.cat([batch["input_ids"][i, :1], batch["targets"][i]])[: int(pl + rl)]
            for i, (pl, rl) in enumerate(zip(batch["prompt_lens"], batch["response_lens"]))]
    assert all(torch.equal(s[: len(p)], p) and len(s) == len(p) + 16 for s, p in zip(seqs, prompts))
    _assert_deployed(task.student, seqs, [len(p) for p in prompts], log)


def test_distillm2_student_responses_use_the_deployed_cache():
    task = _distill_task("distillm2", distillm2=DistiLLM2Config(max_new_tokens=16, pairs="online"))
    prompts = _prompts()
    log = _record_logits(task.student)
    batches, plain_loss = [], DistillLoss(task.student, task.teacher, DistillLossConfig())

    def divergence_loss(batch, *a, **kw):
        batches.append(batch)
        return plain_loss(batch, *a, **kw)

    task.objective.loss({"prompts": prompts}, StepInfo(0, 10), divergence_loss)
    teacher_batch, student_batch = batches
    seqs = [torch.cat([student_batch["input_ids"][i, :1], student_batch["targets"][i]])[: len(p) + 16]
            for i, p in enumerate(prompts)]
    assert all(int(n) == 16 for n in student_batch["response_lens"])
    _assert_deployed(task.student, seqs, [len(p) for p in prompts], log)
    # The teacher answered with its own (plain) cache: its responses are not the student's.
    assert not torch.equal(teacher_batch["input_ids"], student_batch["input_ids"])


# ------------------------------------------------------------------------------------------------ SKD
def _record_forward(model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(ids, positions, last-position logits or None) of every cached forward of ``model``."""
    log, plain = [], model.forward

    def forward(ids, *, positions=None, cache=None, **kw):
        out = plain(ids, positions=positions, cache=cache, **kw)
        if cache is not None:
            last = model.logits(out.hidden[:, -1]).detach().clone() if ids.shape[1] == 1 else None
            log.append((ids.clone(), positions.clone(), last))
        return out

    model.forward = forward
    return log


@pytest.mark.parametrize(
    "policy,sharding,gamma",
    [
        ("h2o", False, 4),
        ("streaming_llm", False, 4),
        ("h2o", True, 8),
        (None, True, 8),  # rows accept different counts: the re-feed pads up to gamma - 1 slots per row
    ],
)
def test_skd_student_proposals_use_the_deployed_cache_and_restore_after_rejections(policy, sharding, gamma):
    student = _student(policy, sharding)
    torch.manual_seed(1)
    teacher = _peaky(Decoder(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64))).eval()
    prompts = _prompts()
    log = _record_forward(student)
    res = speculative_kd_sample(student, teacher, prompts, SKDConfig(gamma=gamma, top_k=200), 20,
                                generator=torch.Generator().manual_seed(2))
    assert res.replaced > 3 and res.accepted > 3  # rejections happened: the cache was restored and re-fed
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, res.responses)]
    refs = [_references(student, s) for s in seqs]
    # What each row's cache should hold: the last token fed at every position (a restore + re-feed
    # rewrites positions from the round's `cur` on). A proposal's logits are comparable with the final
    # sequence's forward when everything fed so far is that sequence's prefix.
    fed = [dict() for _ in seqs]
    n_checked, gap = 0, 0.0
    for ids, pos, last in log:
        for i, seq in enumerate(seqs):
            for tok, p in zip(ids[i].tolist(), pos[i].tolist()):
                if p >= 0:
                    fed[i] = {q: t for q, t in fed[i].items() if q < p}
                    fed[i][p] = tok
            p = int(pos[i, -1])
            if last is None or p < 0 or p >= len(seq) - 1:
                continue
            if [fed[i].get(q) for q in range(p + 1)] != seq[: p + 1].tolist():
                continue  # a proposal after a rejected one
            masked, full = refs[i]
            scale = float(masked[p].abs().max())
            torch.testing.assert_close(last[i], masked[p], rtol=1e-4, atol=1e-4 * scale)
            gap = max(gap, float((full[p] - masked[p]).abs().max()) / scale)
            n_checked += 1
    assert n_checked >= sum(len(r) for r in res.responses) - len(seqs)  # (nearly) every kept token checked
    assert gap > 1e-2
