"""H2O (Zhang et al., 2023): heavy hitters (largest accumulated attention received) + recent window.

Budget split heavy/recent by ``heavy_ratio``/``recent_ratio`` (10%/10% -> half each); no sinks (heavy
hitters find them). Chunk-sequential: decisions every C tokens from dense no-grad attention column
sums over the rows before the chunk (exclusive prefix), eviction permanent; see
:mod:`pikv_train.cache.policies.sequential` for the exact rule and the deviations from per-token H2O.
Measured agreement of the C = 32 training mask with per-token (C = 1) decisions: see
``H2OScheduler`` docstring.
"""

from __future__ import annotations

from pikv_train.cache.policies.sequential import ChunkSequentialPolicy


class H2OScheduler(ChunkSequentialPolicy):
    """Heavy-Hitter Oracle, chunk-sequential (decisions every ``chunk_size`` tokens).

    AGREEMENT_WITH_PER_TOKEN is filled from ``benchmarks/cache_policy_eval.py --agreement``.
    """

    has_sinks = False

    def score(self, imp, freq, last, pos, s0, cand):
        return imp
