"""FastV (Chen et al., ECCV 2024): after layer K, the later layers drop the R share of earlier tokens that
received the least attention at layer K.

FastV ranks the (image) tokens by the attention the last token pays them at layer K, averaged over heads, and
the layers after K never see the dropped R% (FastV: K = 2, R = 50%). Layers 0..K keep every token. Indexing: as
SPEC §6 words it, ``fastv_layer`` K is the layer whose attention ranks and the layers after it prune; FastV's code
ranks with the attention of layer K - 1 and prunes from layer K (0-indexed), so FastV's K = 2 is ``fastv_layer: 1``
here.

Causal form (module docstring of :mod:`~pikv_train.cache.compression.token_select`): the observation window is the
last ``obs_window`` rows before each boundary (FastV's "last token", widened so that a decision depends on more than
one query), their layer-K attention over every earlier key, summed over the kv-heads, not pooled; of the tokens
that have left the window so far, ``round((1 - R) * n)`` stay (the previous choice plus the keys leaving now
compete; a dropped one never returns), one choice for all kv-heads and all layers after K. FastV drops only image
tokens; here every token outside the window is a candidate.
"""

from __future__ import annotations

from pikv_train.cache.compression.token_select import TokenSelectPolicy


class FastVCompressor(TokenSelectPolicy):
    """FastV: layer K's window attention chooses the tokens layers > K keep."""

    name = "fastv"
    stores_selection_at_source = False  # layer K itself keeps every token
    skips_when_budget_covers = False  # cache.budget plays no part: R sets the share kept
    pools = False

    def bind(self, model_cfg) -> None:
        super().bind(model_cfg)
        self._check_layer()

    def __init__(self, cfg=None, model_cfg=None, **overrides):
        super().__init__(cfg, model_cfg, **overrides)
        self._check_layer()

    def _check_layer(self) -> None:
        if self.n_layer is not None and self.ccfg.fastv_layer >= self.n_layer - 1 and not getattr(self, "_warned", 0):
            import warnings

            self._warned = True
            warnings.warn(f"model.init_args.cache.compressor.fastv_layer={self.ccfg.fastv_layer}: no layer comes after "
                          f"it in this {self.n_layer}-layer model, so FastV keeps every token; set fastv_layer below "
                          f"{self.n_layer - 1}", stacklevel=3)

    def window(self, budget):
        return self.ccfg.obs_window

    def source(self, layer):
        return None if layer <= self.ccfg.fastv_layer else self.ccfg.fastv_layer

    def n_select(self, layer, budget, n_decided):
        return int(round((1 - self.ccfg.fastv_ratio) * n_decided))

    def select(self, score, cand, n):
        shared = score.sum(1, keepdim=True)  # one ranking for all kv-heads (FastV averages over heads)
        return super().select(shared, cand[:, :1], n).expand_as(cand)
