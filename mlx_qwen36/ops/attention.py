"""Scaled dot-product attention over a KV cache: MLX's fused kernel where it is fast, the CPU's own forms there.

On Metal, `mx.fast.scaled_dot_product_attention` is already one launch for decode (its vector kernel) and for
prefill, so there is no custom kernel here. The CPU back end's SDPA is a longer chain of ops: decode takes one
grouped matmul form, and prefill splits the kv heads over its two threads.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import kernels
from .cpu import worker_stream


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """q [B, heads, T, D], k and v [B, kv heads, S, D] -> [B, heads, T, D]."""
    T = q.shape[2]
    if mx.default_device() != mx.cpu or kernels.metal_graph():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if T == 1:
        return _cpu_decode(q, k, v, scale, mask)
    Hq, Hk = q.shape[1], k.shape[1]
    stream = worker_stream() if Hk % 2 == 0 else None
    if stream is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    # Each half of the kv heads (with their query heads) on one of two CPU threads.
    hq, hk = Hq // 2, Hk // 2
    first = mx.fast.scaled_dot_product_attention(q[:, :hq], k[:, :hk], v[:, :hk], scale=scale, mask=mask)
    with mx.stream(stream):
        second = mx.fast.scaled_dot_product_attention(q[:, hq:], k[:, hk:], v[:, hk:], scale=scale, mask=mask)
    return mx.concatenate([first, second], axis=1)


def _cpu_decode(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """One query per row: the query heads of each kv head form one [rep, D] matrix against that head's keys."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    scores = (q.reshape(B, Hkv, Hq // Hkv, D) * scale) @ k.swapaxes(-1, -2)  # [B, Hkv, rep, S]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    o = mx.softmax(scores, axis=-1, precise=True) @ v  # [B, Hkv, rep, D]
    return o.reshape(B, Hq, 1, D)


def rotary_decode(q: mx.array, k: mx.array, position: int | mx.array, rope: Any) -> tuple[mx.array, mx.array]:
    """q [B, heads, 1, D] and k [B, kv heads, 1, D] rotated at `position` (an int, or [B] per row) by `rope` (the
    layer's `Rotary`): `mx.fast.rope` on Metal, one launch each; on the CPU, whose RoPE is a chain of ops, one
    cos/sin computed for both, as `mx.fast.rope`'s CPU path computes it (YaRN scaling folded in)."""
    if mx.default_device() != mx.cpu or kernels.metal_graph():
        return rope(q, position), rope(k, position)
    position = mx.array(position, dtype=mx.float32)
    theta = position[..., None] * mx.reciprocal(rope.freqs)
    if position.ndim == 1:
        theta = theta[:, None, None, :]
    cos, sin = mx.cos(theta), mx.sin(theta)
    if rope.scaling != 1.0:
        cos, sin = cos * rope.scaling, sin * rope.scaling
    cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """NeoX rotate-half rotary on the first 2·len(cos) dims of x [..., D], the rest passed through."""
    half = cos.shape[-1]
    x1, x2, rest = mx.split(x, [half, 2 * half], axis=-1)
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], axis=-1)
