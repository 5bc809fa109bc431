"""PyramidKV (Cai et al., 2024): per-layer budgets that shrink with depth, SnapKV selection in each layer.

With an average budget of b tokens per layer and an observation window w, the selected (non-window) tokens of
layer l are ``max_n - l * steps`` with ``min_n = (b - w) // beta``, ``max_n = 2 (b - w) - min_n`` and
``steps = (max_n - min_n) // (L - 1)`` (PyramidKV's ``PyramidKVCluster``: lower layers, where attention is
spread, keep more; the total is that of a uniform budget up to rounding). Selection: SnapKV's pooled
observation-window scores, per kv-head (the window rows' attention averaged over the kv-head's query heads).

Deviations, to train what is decoded (module docstring of :mod:`~pikv_train.cache.compression.token_select`):
the selection runs causally every C rows instead of once after the prompt, and a lower layer's larger budget
is not capped by the prompt length (PyramidKV lowers ``max_n`` when the prompt is short).
"""

from __future__ import annotations

from pikv_train.cache.compression.token_select import TokenSelectPolicy


class PyramidKVCompressor(TokenSelectPolicy):
    """PyramidKV: pyramidal per-layer budgets, SnapKV selection per kv-head."""

    name = "pyramid_kv"

    def n_select(self, layer, budget, n_decided):
        sel = budget - self.window(budget)
        n_layer = self.n_layer or 1
        if n_layer == 1:
            return sel
        min_n = sel // self.ccfg.pyramid_beta
        max_n = 2 * sel - min_n
        steps = (max_n - min_n) // (n_layer - 1)
        return max_n - layer * steps

    def layer_budgets(self, budget: int) -> list[int]:
        """Tokens each layer holds at most (window + selected), for logs and docs."""
        return [self.window(budget) + self.n_select(i, budget, 0) for i in range(self.n_layer or 1)]
