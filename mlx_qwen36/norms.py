"""The two RMSNorm kinds of Qwen3.6.

Zero-centred norms (`x·(1+w)`, every norm but the GDN output norm) are stored with the +1 already added by the
loader, in fp32: MLX's fused `rms_norm` then normalises and multiplies in fp32 and the result is cast once, as in
the reference (1 + w rounded to bf16 flips a bf16 model's top-1 token measurably more often). The GDN output norm
is plain and gated by SiLU(z).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RMSNorm(nn.Module):
    """`rms_norm(x) * weight` in fp32, cast to x's dtype; `weight` holds 1 + w of the zero-centred checkpoint norm."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,), dtype=mx.float32)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps).astype(x.dtype)


class RMSNormGated(nn.Module):
    """GDN output norm: plain weight, statistics in fp32, then multiplied by SiLU(z) in fp32 (as the reference).

    It holds the weight only: the norm is applied inside `ops.gated_delta_mixer`, fused with the mixer."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
