"""Low-rank latent KV (SPEC §6): Palu's SVD latent (``svd``), a learned latent initialised from it (``lora``),
and the same trained with LoRA+ learning rates (``lora_plus``).

Per layer and kv-head, the key projection W_k (head_dim x d_model) is replaced by a rank-r product B A
(A: r x d_model, B: head_dim x r), likewise W_v. The cache stores the latent ``h = x A^T`` (r values per token
instead of head_dim) and reconstructs at read: keys ``RoPE(h B^T)`` (RoPE after reconstruction, as Palu does
so that the latent carries no position), values ``h B^T``.

* ``svd`` (Palu, Chang et al., ICLR 2025; per-head decomposition, "M-LRD"): training-free. A and B come from
  the SVD of the *current* W_k / W_v: with W = U S V^T, B = U_r and A = U_r^T W, so B A is the best rank-r
  approximation of W. Recomputed whenever the weights change, so a student trained under ``svd`` trains W
  through the rank-r projection (the gradient reaches W through A; U_r is held fixed within a step). Palu
  fuses B into the output projection for values and uses grouped-head SVD with a Walsh-Hadamard transform
  for its quantized variant; neither changes what is stored per token and neither is done here. Palu also
  whitens the SVD with calibration activations (SVD-LLM's Cholesky factor) and searches per-layer ranks by
  Fisher information; here the SVD is of W itself (the best rank-r approximation of the weights, not of the
  activations) with one rank everywhere, a weaker training-free baseline.
* ``lora``: A and B are trainable parameters of the student, initialised from the SVD when the compressor is
  attached (balanced: B = U_r S_r^1/2, A = S_r^1/2 V_r^T) and trained with it; the model's own K/V projection
  is frozen and unused while the latent is on (MHA2MLA, Ji et al. 2025, fine-tunes an SVD-initialised
  latent the same way). When the latent leaves the model (another compressor is set) and whenever a checkpoint
  is written, B A is folded into the K/V projection (exact), so every path that reads only the model's weights
  (a teacher or ``student_init`` from this checkpoint, evaluation under another compressor) sees the trained
  K/V.
* ``lora_plus``: ``lora`` whose up-projections B train at ``lora_plus_ratio`` (16) times the learning rate of
  A (LoRA+, Hayou et al., ICML 2024): the optimizer gives them their own parameter group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pikv_train.cache.compression.base import KVCompressor
from pikv_train.models.layers import apply_rotary


def _head_weights(attn, n_kv: int, hd: int) -> tuple[Tensor, Tensor]:
    """The K and V projection weights of one attention layer, per kv-head: (H_kv, hd, d) each."""
    w = attn.kv_proj.weight
    return w[: n_kv * hd].view(n_kv, hd, -1), w[n_kv * hd:].view(n_kv, hd, -1)


class SVDCompressor(KVCompressor):
    """Palu's training-free low-rank latent: B = U_r, A = U_r^T W from the SVD of the current weights."""

    name = "svd"

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.rank = cfg.rank_for(self.head_dim)
        self._bases: dict[int, tuple] = {}  # layer -> (weight version key, U_r of K, U_r of V)
        self._rotary: list = []

    def attach(self, model) -> None:
        self._rotary = [model.rotary]  # a plain reference: the rotary tables are the model's, not ours
        self._layers = [blk.attn for blk in model.blocks]

    def _rope(self, x: Tensor, pos: Tensor) -> Tensor:
        """x (..., S, hd) at positions pos (S,) or (B, S)."""
        cos, sin = self._rotary[0](pos.clamp_min(0) if pos.dim() == 2 else pos.clamp_min(0)[None])
        if x.dim() == 2:
            return apply_rotary(x[None, None], cos, sin)[0, 0]
        return apply_rotary(x, cos, sin)

    @torch.no_grad()
    def bases(self, layer_idx: int, attn) -> tuple[Tensor, Tensor]:
        """U_r (H_kv, hd, r) of the key and of the value projection, recomputed when the weights change."""
        w = attn.kv_proj.weight
        key = (w.data_ptr(), w._version)
        hit = self._bases.get(layer_idx)
        if hit is None or hit[0] != key:
            wk, wv = _head_weights(attn, self.n_kv_head, self.head_dim)
            uk = torch.linalg.svd(wk.float(), full_matrices=False).U[..., : self.rank].to(w.dtype)
            uv = torch.linalg.svd(wv.float(), full_matrices=False).U[..., : self.rank].to(w.dtype)
            hit = (key, uk, uv)
            self._bases[layer_idx] = hit
        return hit[1], hit[2]

    def latents(self, layer_idx: int, attn, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H_kv, T, r) key and value latents of x (B, T, d)."""
        b, t, _ = x.shape
        uk, uv = self.bases(layer_idx, attn)
        k, v = attn.kv_proj(x).view(b, t, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k @ uk[None], v @ uv[None]

    def up(self, layer_idx: int, head: int | None) -> tuple[Tensor, Tensor]:
        """B of keys and values: (H_kv, hd, r), or (hd, r) for one head."""
        uk, uv = self.bases(layer_idx, self._layers[layer_idx])
        return (uk, uv) if head is None else (uk[head], uv[head])

    def kv(self, layer_idx, attn, x, cos, sin):
        hk, hv = self.latents(layer_idx, attn, x)
        bk, bv = self.up(layer_idx, None)
        k = apply_rotary(hk @ bk.transpose(-1, -2)[None], cos, sin)
        return k, hv @ bv.transpose(-1, -2)[None], {"k": hk, "v": hv}

    def decode(self, layer_idx, head, codes, pos):
        bk, bv = self.up(layer_idx, head)
        return self._rope(codes["k"] @ bk.t(), pos), codes["v"] @ bv.t()

    def bytes_per_token_head(self, element_size, context):
        return 2 * self.rank * element_size


class LoRACompressor(SVDCompressor):
    """Trainable latent: A (down) and B (up) per layer and kv-head, initialised from the SVD, trained with
    the student; the layer's own K/V projection is frozen while it is on."""

    name = "lora"
    lr_ratio = 1.0
    """Learning-rate multiplier of the up-projections (LoRA+ sets it)."""

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        n, h, hd, r, d = model_cfg.n_layer, self.n_kv_head, self.head_dim, self.rank, model_cfg.d_model
        self.down_k, self.down_v = nn.Parameter(torch.zeros(n, h, r, d)), nn.Parameter(torch.zeros(n, h, r, d))
        self.up_k, self.up_v = nn.Parameter(torch.zeros(n, h, hd, r)), nn.Parameter(torch.zeros(n, h, hd, r))

    def attach(self, model) -> None:
        """Initialise A and B from the SVD of the model's current K/V projections (a checkpoint loaded
        afterwards overwrites them) and freeze those projections."""
        super().attach(model)
        with torch.no_grad():
            for name, value in self.factors_from([blk.attn.kv_proj.weight for blk in model.blocks]).items():
                getattr(self, name).copy_(value)
        for blk in model.blocks:
            blk.attn.kv_proj.weight.requires_grad_(False)

    @torch.no_grad()
    def factors_from(self, kv_weights: list[Tensor]) -> dict[str, Tensor]:
        """The SVD initialisation (balanced: B = U_r S_r^1/2, A = S_r^1/2 V_r^T) from each layer's kv_proj weight."""
        out = {n: torch.zeros_like(getattr(self, n)) for n in ("down_k", "down_v", "up_k", "up_v")}
        for i, w in enumerate(kv_weights):
            wk, wv = w[: self.n_kv_head * self.head_dim], w[self.n_kv_head * self.head_dim:]
            for part, down, up in ((wk, "down_k", "up_k"), (wv, "down_v", "up_v")):
                u, s, vh = torch.linalg.svd(part.reshape(self.n_kv_head, self.head_dim, -1).float(), full_matrices=False)
                root = s[..., : self.rank].sqrt()
                out[up][i] = u[..., : self.rank] * root[:, None, :]
                out[down][i] = root[..., None] * vh[:, : self.rank]
        return out

    def state_from_weights(self, state_dict: dict, model_prefix: str) -> dict[str, Tensor]:
        """Factors for a checkpoint written without them (evaluating a dense-trained student under ``lora``):
        the SVD initialisation of that checkpoint's own K/V projections, keyed like ``state_dict()``."""
        ws = [state_dict[f"{model_prefix}blocks.{i}.attn.kv_proj.weight"] for i in range(self.n_layer)]
        return self.factors_from(ws)

    @torch.no_grad()
    def detach(self, model) -> None:
        """Leaving the model (another policy/compressor set, or a checkpoint written): fold the trained latent into
        the K/V projection (exact: K = RoPE(B A x), so W_k <- B A) and make the projection trainable again, so no
        path that drops the factors reverts to stale weights."""
        self.fold(model)
        for blk in model.blocks:
            blk.attn.kv_proj.weight.requires_grad_(True)

    @torch.no_grad()
    def fold(self, model) -> None:
        """Write B A into each layer's kv_proj weight (the projection is unused while the latent is on)."""
        n, hd = self.n_kv_head, self.head_dim
        for i, blk in enumerate(model.blocks):
            w = blk.attn.kv_proj.weight
            w[: n * hd].copy_((self.up_k[i] @ self.down_k[i]).reshape(n * hd, -1))
            w[n * hd:].copy_((self.up_v[i] @ self.down_v[i]).reshape(n * hd, -1))

    def param_groups(self) -> tuple[list, list]:
        """(down-projections, up-projections) for the optimizer's compressor groups."""
        return [self.down_k, self.down_v], [self.up_k, self.up_v]

    def latents(self, layer_idx, attn, x):
        hk = torch.einsum("btd,hrd->bhtr", x, self.down_k[layer_idx])
        hv = torch.einsum("btd,hrd->bhtr", x, self.down_v[layer_idx])
        return hk, hv

    def up(self, layer_idx, head):
        if head is None:
            return self.up_k[layer_idx], self.up_v[layer_idx]
        return self.up_k[layer_idx, head], self.up_v[layer_idx, head]


class LoRaPlusPlusCompressor(LoRACompressor):
    """``lora`` trained with LoRA+: the up-projections B at ``lora_plus_ratio`` x the learning rate."""

    name = "lora_plus"

    def __init__(self, cfg, model_cfg):
        super().__init__(cfg, model_cfg)
        self.lr_ratio = float(cfg.lora_plus_ratio)
