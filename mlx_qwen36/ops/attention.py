"""Scaled dot-product attention over a KV cache: MLX's fused kernel where it is fast, the CPU's own forms there.

On Metal, `mx.fast.scaled_dot_product_attention` is already one launch for decode (its vector kernel) and for
prefill, so there is no custom kernel here. The CPU back end's SDPA is a longer chain of ops: decode takes one
grouped matmul form, and prefill splits the kv heads over its two threads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx

from . import kernels
from .cpu import worker_stream


class QuantizedKV(NamedTuple):
    """Keys or values of a quantized KV cache, [B, kv heads, S, D] as affine `mx.quantize` groups along D."""

    weight: mx.array  # uint32 [B, kv heads, S, D * bits / 32]
    scales: mx.array  # [B, kv heads, S, D / group_size]
    biases: mx.array
    bits: int
    group_size: int


def attention(q: mx.array, k: mx.array | QuantizedKV, v: mx.array | QuantizedKV, scale: float,
              mask: mx.array | str | None) -> mx.array:
    """q [B, heads, T, D], k and v [B, kv heads, S, D] (or quantized) -> [B, heads, T, D]."""
    T = q.shape[2]
    if isinstance(k, QuantizedKV):
        return quantized_attention(q, k, v, scale, mask)
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


def quantized_attention(q: mx.array, k: QuantizedKV, v: QuantizedKV, scale: float,
                        mask: mx.array | str | None) -> mx.array:
    """Attention reading the quantized cache as it is stored: scores by a quantized matmul against the keys,
    the output by one against the values (no dequantized copy of the cache). The query heads of each kv head are
    one [rep * T, D] block, as in mlx-lm's quantized SDPA."""
    B, Hq, T, D = q.shape
    Hkv, S = k.weight.shape[1], k.weight.shape[2]
    rep = Hq // Hkv
    quant = {"group_size": k.group_size, "bits": k.bits}
    qs = (q * scale).reshape(B, Hkv, rep * T, D)
    scores = mx.quantized_matmul(qs, k.weight, k.scales, k.biases, transpose=True, **quant)  # [B, Hkv, rep*T, S]
    if isinstance(mask, str):  # "causal", aligned bottom-right past the cached prefix
        mask = mx.arange(S)[None, :] <= (mx.arange(T) + S - T)[:, None]  # [T, S]
    if mask is not None:  # [T, S] or [B, 1, T, S]: the same rows for each query head of a kv head
        scores = mx.where(mx.tile(mask, (1,) * (mask.ndim - 2) + (rep, 1)), scores, -mx.inf)
    p = mx.softmax(scores, axis=-1, precise=True).astype(q.dtype)
    o = mx.quantized_matmul(p, v.weight, v.scales, v.biases, transpose=False, **quant)  # [B, Hkv, rep*T, D]
    return o.reshape(B, Hq, T, D)


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
