"""LRU+ (PiKV's LRUPlusScheduler): score = 0.3 recency + 0.3 frequency + 0.4 importance.

recency = last use / (s0 - 1), frequency = uses / max uses, importance = accumulated attention / max
accumulated attention (maxima over the candidates), each in [0, 1]; weights ``lru_plus_weights``. Use,
sinks and the chunk-sequential schedule as in LRU / H2O.
"""

from __future__ import annotations


from pikv_train.cache.policies.sequential import ChunkSequentialPolicy


def _norm(x, cand):
    mx = x.masked_fill(~cand, 0).amax(-1, keepdim=True)
    return x / mx.clamp_min(1e-12)


class LRUPlusScheduler(ChunkSequentialPolicy):
    """Weighted recency / frequency / importance eviction, chunk-sequential."""

    def score(self, imp, freq, last, pos, s0, cand):
        wr, wf, wi = self.cfg.lru_plus_weights
        return wr * last / max(s0 - 1, 1) + wf * _norm(freq, cand) + wi * _norm(imp, cand)
