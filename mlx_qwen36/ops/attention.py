"""Scaled dot-product attention over a KV cache: MLX's fused kernel where it is fast, the CPU's own forms there.

On Metal, `mx.fast.scaled_dot_product_attention` is already one launch for decode (its vector kernel) and for
prefill, so there is no custom kernel here. The CPU back end's SDPA is a longer chain of ops: decode takes one
grouped matmul form, and prefill splits the kv heads over its two threads.
"""

from __future__ import annotations

import mlx.core as mx

from .cpu import worker_stream


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
    """q [B, heads, T, D], k and v [B, kv heads, S, D] -> [B, heads, T, D]."""
    T = q.shape[2]
    if mx.default_device() != mx.cpu:
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
