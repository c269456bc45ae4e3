"""Rotary embedding of the gated-attention layers: partial (first 64 of 256 dims), NeoX rotate-half, theta 1e7.

Text tokens have equal t/h/w positions, so interleaved M-RoPE reduces to 1-D RoPE at the text position and
`mx.fast.rope` does the work. Explicit [3, B, T] position ids (vision tokens) take the M-RoPE path, where
frequency i reads axis i % 3 (within `mrope_section`).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .config import TextConfig


def inv_frequencies(cfg: TextConfig) -> tuple[np.ndarray, float]:
    """inv_freq [rotary_dim/2] in float64 and the attention scaling applied to cos/sin (YaRN only)."""
    dim, rope = cfg.rotary_dim, cfg.rope
    inv_freq = 1.0 / rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope.rope_type != "yarn":
        return inv_freq, 1.0
    # transformers' _compute_yarn_parameters, with its default truncation.
    factor = rope.factor
    original = rope.original_max_position_embeddings or cfg.max_position_embeddings / factor

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    scaling = rope.attention_factor
    if scaling is None:
        scaling = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(scaling)


def mrope_axis(cfg: TextConfig) -> np.ndarray:
    """For each rotary frequency, which position axis (0=t, 1=h, 2=w) drives it (interleaved layout)."""
    half = cfg.rotary_dim // 2
    section = cfg.rope.mrope_section
    axis = np.zeros(half, dtype=np.int32)
    for a in (1, 2):
        axis[np.arange(a, min(half, 3 * section[a]), 3)] = a
    return axis


def rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


class Rotary:
    """Applies partial rotary to q and k laid out [B, heads, T, head_dim]."""

    def __init__(self, cfg: TextConfig):
        inv_freq, self.scaling = inv_frequencies(cfg)
        self.dims = cfg.rotary_dim
        self.inv_freq = mx.array(inv_freq, dtype=mx.float32)
        self.freqs = mx.array(1.0 / inv_freq, dtype=mx.float32)
        axis = mrope_axis(cfg)
        self.axis_onehot = mx.array((axis[None, :] == np.arange(3)[:, None]).astype(np.float32))  # [3, half]

    def __call__(self, x: mx.array, offset: int | mx.array = 0, position_ids: mx.array | None = None) -> mx.array:
        if position_ids is not None:
            return self._mrope(x, position_ids)
        if self.scaling != 1.0:
            x = mx.concatenate([x[..., : self.dims] * self.scaling, x[..., self.dims :]], axis=-1)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self.freqs)

    def _mrope(self, x: mx.array, position_ids: mx.array) -> mx.array:
        # position_ids [3, B, T] -> angles [B, T, half] taking, for frequency i, the axis self.axis[i].
        pos = position_ids.astype(mx.float32)[..., None] * self.inv_freq  # [3, B, T, half]
        angles = (pos * self.axis_onehot[:, None, None, :]).sum(axis=0)
        angles = mx.concatenate([angles, angles], axis=-1)[:, None]  # [B, 1, T, dims]
        cos = (mx.cos(angles) * self.scaling).astype(x.dtype)
        sin = (mx.sin(angles) * self.scaling).astype(x.dtype)
        rot, rest = x[..., : self.dims], x[..., self.dims :]
        return mx.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1)
