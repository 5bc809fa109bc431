"""LRU: evict the least recently used key; query s 'uses' key j when A[s, j] >= tau or j is in row s's
top-m (``lru_threshold``, ``lru_top_m``). Last use u(j) = max({j} ∪ {s < s0 : used(s, j)}); sinks are
protected (without a use signal LRU collapses to FIFO, the sliding window StreamingLLM shows fails
without sinks). Chunk-sequential like H2O (:mod:`pikv_train.cache.policies.sequential`); ties in u
are broken towards the more recent key.
"""

from __future__ import annotations

from pikv_train.cache.policies.sequential import ChunkSequentialPolicy


class LRUScheduler(ChunkSequentialPolicy):
    """Least-recently-used eviction with attention-defined use, chunk-sequential."""

    def score(self, imp, freq, last, pos, s0, cand):
        return last * (s0 + 1) + pos.double()  # lexicographic (last use, position)
