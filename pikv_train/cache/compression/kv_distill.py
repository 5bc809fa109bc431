"""KV-Distill (Chari, Qin, Van Durme, 2025): a learned scorer keeps the top tokens, the kept tokens' keys and values
come from LoRA-adapted K/V projections, trained by KL between the same model's next-token distributions with the
full cache (the teacher: ``teacher.student_itself``) and with the compressed one (SPEC §6).

Per layer: a scorer ``s_j = w·x_j + b`` on the layer's attention input and a LoRA pair (A: d -> r, B: r -> 2 H_kv
d_h, B zero at init, so training starts from the base projection) on the K/V projection. A token is read with its
base key/value while it is in the recent window of ``obs_window`` tokens; when it leaves, it is kept, in its adapted
form (keys rotated after adaptation), only if it is among the ``budget - window`` best-scored tokens (the previous
choice plus the tokens leaving now compete every ``cache.chunk_size`` rows, as in the other token compressors;
one choice for all kv-heads). The cache stores both forms of the window tokens the next row reads in base form and
the adapted form of the kept ones, with their scores.

The scorer's hard top-k sends no gradient, so the kept tokens' values are scaled by ``1 + s_j - stopgrad(s_j)``:
the forward is unchanged and the scorer learns how much each kept token's contribution lowers the loss.

Deviations, stated because the paper's method section was not available to us (its repository holds no code):
the scorer is per layer (KV-Distill scores once, at one layer, for every layer), the adapters act on the K/V
projection only, the selection is causal and repeated (KV-Distill compresses a context once), and the loss is the
framework's ``kd`` divergence (``loss.kind``; KV-Distill mixes forward and reverse KL, which ``kind: skl``-style
settings approximate).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pikv_train.cache.compression.base import KVCompressor, Store, Versions
from pikv_train.cache.compression.token_select import TokenSelectCache, TokenSelectPolicy


class KVDistillStorage(KVCompressor):
    """The trainable part: scorers and K/V LoRA factors of every layer; stores the window's base form and the
    kept tokens' adapted form."""

    name = "distillation"
    versioned = True  # a token is read in its base form inside the window, adapted after

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        d, r, out = model_cfg.d_model, cfg.distill_rank, 2 * model_cfg.n_kv_head * model_cfg.head_dim
        self.scorer = nn.ModuleList(nn.Linear(d, 1) for _ in range(model_cfg.n_layer))
        self.lora_a = nn.ParameterList(nn.Parameter(torch.randn(r, d) / math.sqrt(d)) for _ in range(model_cfg.n_layer))
        self.lora_b = nn.ParameterList(nn.Parameter(torch.zeros(out, r)) for _ in range(model_cfg.n_layer))
        for lin in self.scorer:
            nn.init.normal_(lin.weight, std=d**-0.5)
            nn.init.zeros_(lin.bias)
        self.window = 1  # set by the policy (its observation window)
        self._last: dict[int, tuple] = {}  # layer -> (adapted k, adapted v, scores) of the forward being computed

    def param_groups(self) -> tuple[list, list]:
        """(down, up) optimizer groups: scorers and LoRA A, LoRA B."""
        return list(self.scorer.parameters()) + list(self.lora_a), list(self.lora_b)

    def kv(self, layer_idx, attn, x, cos, sin):
        from pikv_train.models.layers import apply_rotary

        b, t, _ = x.shape
        k, v = attn.project_kv(x, cos, sin)
        delta = (x @ self.lora_a[layer_idx].t()) @ self.lora_b[layer_idx].t()  # (B, T, 2 H_kv hd)
        raw = attn.kv_proj(x) + delta
        ka, va = raw.view(b, t, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        ka = apply_rotary(ka, cos, sin)
        score = self.scorer[layer_idx](x).squeeze(-1)  # (B, T)
        self._last[layer_idx] = (ka, va, score)
        sc = score[:, None].expand(b, self.n_kv_head, t)
        return k, v, {"k": k, "v": v, "ka": ka, "va": va, "score": sc.detach()}

    def scores(self, layer_idx: int) -> Tensor:
        """(B, T) the detached scores of the tokens of the forward being computed."""
        return self._last[layer_idx][2].detach()

    def versions(self, layer_idx, k, v):
        ka, va, score = self._last[layer_idx]
        t = k.shape[2]
        i = torch.arange(t, device=k.device)
        causal = i[None] <= i[:, None]
        recent = causal & (i[:, None] - i[None] < self.window)
        gate = 1 + score - score.detach()  # forward 1; the scorer's straight-through gradient via the values
        va = va * gate[:, None, :, None]
        cut = (i - self.window + 1).clamp_min(0)  # row t reads keys j < cut[t] adapted (prefix rule, for logits)
        return Versions(keys=[ka, k], values=[va, v], select=[causal & ~recent, recent], key_q=ka, key_cut=cut)

    def new_store(self, layer_idx, head, like):
        return KVDistillStore(self.window, like)

    def bytes_per_token_head(self, element_size, context):
        """Every kept token's adapted key + value and its score; the base forms of the window's w - 1 tokens the
        next row reads on top (amortised)."""
        w = min(self.window - 1, context)
        return 2 * self.head_dim * element_size * (1 + w / context) + element_size


class KVDistillStore(Store):
    """One (sequence, kv-head): the adapted keys/values and scores of every held token, and the base form of the
    held tokens still in the recent window (the last ones, in position order)."""

    def __init__(self, window: int, like: Tensor):
        hd = like.shape[-1]
        self.w = window
        self.ka, self.va, self.kb, self.vb = (like.new_zeros(0, hd) for _ in range(4))
        self.score = like.new_zeros(0)

    def read(self, t, pos):
        if not len(self.ka):
            return None
        if t is not None:  # tokens that left the window lose their base form
            n_in = int((t - pos >= 0).logical_and(t - pos < self.w).sum())
            self.kb, self.vb = self.kb[len(self.kb) - n_in:], self.vb[len(self.vb) - n_in:]
        n = len(self.ka) - len(self.kb)
        return torch.cat([self.ka[:n], self.kb]), torch.cat([self.va[:n], self.vb])

    def commit(self, codes, pos_all, keep):
        self.ka, self.va = torch.cat([self.ka, codes["ka"]])[keep], torch.cat([self.va, codes["va"]])[keep]
        self.score = torch.cat([self.score, codes["score"]])[keep]
        kb, vb = torch.cat([self.kb, codes["k"]]), torch.cat([self.vb, codes["v"]])
        tail = keep[len(keep) - len(kb):]  # the base forms cover the last tokens
        kb, vb = kb[tail], vb[tail]
        start = max(0, len(kb) - (self.w - 1))  # the next row reads the last w - 1 in base form (and its own token)
        self.kb, self.vb = kb[start:], vb[start:]


class ScoreSelectCache(TokenSelectCache):
    """The token-select cache deciding from the stored learned scores instead of window attention."""

    keeps_queries = False

    def _held_scores(self, st, keys, pos, idx):
        return st["kv"].score[idx].double()  # the store holds a score per held token, in the same order


class DistillationCompressor(TokenSelectPolicy):
    """KV-Distill: learned scorer selection, LoRA-adapted K/V of the kept tokens."""

    name = "distillation"
    cache_cls = ScoreSelectCache
    pools = False

    def __init__(self, cfg=None, model_cfg=None, **overrides):
        super().__init__(cfg, model_cfg, **overrides)
        self.compressor = KVDistillStorage(self.ccfg, model_cfg)  # a submodule: trains and checkpoints
        self.compressor.window = self._window_now()

    def _window_now(self) -> int:
        return self.window(self.budget_tokens()) if self.reference_len else self.ccfg.obs_window

    def bind(self, model_cfg) -> None:
        super().bind(model_cfg)
        self.compressor.window = self._window_now()

    def select(self, score, cand, n):
        return super().select(score.mean(1, keepdim=True), cand[:, :1], n).expand_as(cand)  # one choice per token

    def block_scores(self, qg, kd, keep, j, s0, end, w, layer):
        """The learned scores of the tokens (static per token, the same for every kv-head), not window attention."""
        b, hkv, t = keep.shape
        return self.scores(self.compressor.scores(layer).double()[:, None].expand(b, hkv, t), end - w)

    def training_mask(self, q, k, ctx):
        self.compressor.window = self.window(self.budget_tokens())
        return super().training_mask(q, k, ctx)


__all__ = ["DistillationCompressor", "KVDistillStorage"]
