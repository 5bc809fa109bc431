"""Building blocks shared by teachers and students: RMSNorm, rotary embeddings, SwiGLU."""

from __future__ import annotations

from pikv_train.errors import ConfigError

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (stable under bf16 autocast)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


class Rotary(nn.Module):
    """Rotary position embedding tables; ``forward(positions)`` gives (cos, sin) for any (B, T) positions."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (S, hd/2)
        # Not persistent: derived from the config, so checkpoints stay small and portable.
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ConfigError(
                f"position {int(positions.max())} is beyond the model's max_seq_len={self.max_seq_len}; "
                "shorten data.seq_len / generation length or raise model max_seq_len"
            )
        return self.cos[positions], self.sin[positions]  # (B, T, hd/2) each


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, hd) by per-position angles cos/sin (B, T, hd/2) (half-split convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd/2)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).type_as(x)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
