"""Per-layer caches for the hybrid decoder: a KV cache for gated attention, conv + recurrent state for GDN.

Every cache can be snapshotted and restored, because GDN states cannot be trimmed token by token: prompt reuse across
turns and speculative decoding roll back to a snapshot instead. A snapshot is cheap: MLX arrays are immutable values,
and the KV buffer is only ever written past `offset`, so the rows a snapshot covers are never overwritten.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

from .ops.attention import QuantizedKV


class KVCache:
    """Keys/values [B, n_kv, T, head_dim], grown in steps so decode does not reallocate every token."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def reserve(self, n: int, batch: int, heads: int, k_dim: int, v_dim: int, dtype: mx.Dtype) -> None:
        """Make room for n more tokens past `offset`, growing the buffers by whole steps."""
        prev = self.offset
        if self.keys is not None and prev + n <= self.keys.shape[2]:
            return
        grow = ((n + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((batch, heads, grow, k_dim), dtype)
        new_v = mx.zeros((batch, heads, grow, v_dim), dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, n, D = keys.shape
        self.reserve(n, B, H, D, values.shape[3], keys.dtype)
        prev = self.offset
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def attention_mask(self, T: int) -> str | None:
        """The mask for T new queries over `update`'s keys: causal, aligned bottom-right past the cached prefix."""
        return "causal" if T > 1 else None

    def snapshot(self) -> Any:
        return self.offset

    def restore(self, snapshot: Any) -> None:
        if snapshot > self.offset:
            raise ValueError(f"cannot restore a KV snapshot at {snapshot} tokens into a cache of {self.offset}")
        self.offset = snapshot

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        if arrays:
            self.keys, self.values = arrays
            self.offset = self.keys.shape[2]
        else:
            self.keys = self.values = None
            self.offset = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class QuantizedKVCache(KVCache):
    """A KV cache stored affine-quantized along head_dim (`kv_bits` 4 or 8, groups of `kv_group_size`), as mlx-lm's
    `QuantizedKVCache`: attention reads it quantized (`ops.quantized_attention`). Snapshots, rollback and the prompt
    cache work as for `KVCache` (an offset; the rows past it are never rewritten)."""

    def __init__(self, bits: int = 8, group_size: int = 64) -> None:
        if bits not in (4, 8) or group_size not in (32, 64, 128):
            raise ValueError(f"kv_bits must be 4 or 8 and kv_group_size 32, 64 or 128, got {bits} and {group_size}")
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def _buffers(self, B: int, H: int, n: int, D: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
        return (mx.zeros((B, H, n, D * self.bits // 32), mx.uint32), mx.zeros((B, H, n, D // self.group_size), dtype),
                mx.zeros((B, H, n, D // self.group_size), dtype))

    def update(self, keys: mx.array, values: mx.array) -> tuple[QuantizedKV, QuantizedKV]:
        B, H, n, D = keys.shape
        if D % self.group_size:
            raise ValueError(f"head_dim {D} is not a multiple of kv_group_size {self.group_size}")
        prev = self.offset
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            new = [self._buffers(B, H, grow, D, keys.dtype), self._buffers(B, H, grow, values.shape[3], keys.dtype)]
            if self.keys is None:
                self.keys, self.values = new
            else:
                self.keys, self.values = (tuple(mx.concatenate([a[..., :prev, :], b], axis=2) for a, b in zip(old, add))
                                          for old, add in zip((self.keys, self.values), new))
        self.offset += n
        for store, x in ((self.keys, keys), (self.values, values)):
            for buf, part in zip(store, mx.quantize(x, group_size=self.group_size, bits=self.bits)):
                buf[..., prev:self.offset, :] = part
        return self._view(self.keys), self._view(self.values)

    def _view(self, store: tuple[mx.array, ...]) -> QuantizedKV:
        return QuantizedKV(*(a[..., : self.offset, :] for a in store), self.bits, self.group_size)

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [a[..., : self.offset, :] for a in (*self.keys, *self.values)]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        if arrays:
            self.keys, self.values = tuple(arrays[:3]), tuple(arrays[3:])
            self.offset = self.keys[0].shape[2]
        else:
            self.keys = self.values = None
            self.offset = 0


class GDNCache:
    """Gated DeltaNet state: the last K-1 pre-conv rows [B, K-1, conv_dim] and the recurrence [B, Hv, Dv, Dk] fp32
    (a state column contiguous, as the kernels read it)."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        self.recurrent_state: mx.array | None = None
        self.offset = 0
        # With `record_steps`, a forward also keeps the states after each of its T tokens (`steps`: conv
        # [B, T, K-1, conv_dim], recurrent [B, T, Hv, Dv, Dk]), so that `keep` can rewind to any of them.
        self.record_steps = False
        self.steps: tuple[mx.array, mx.array] | None = None

    def keep(self, n: int) -> None:
        """Keep the first n (>= 1) tokens of the last recorded forward, as if it had been fed only those."""
        conv, rec = self.steps
        T = conv.shape[1]
        if not 1 <= n <= T:
            raise ValueError(f"cannot keep {n} of the {T} tokens of the last forward")
        self.conv_state, self.recurrent_state = conv[:, n - 1], rec[:, n - 1]
        self.offset -= T - n
        self.steps = (conv[:, :n], rec[:, :n])

    def snapshot(self) -> Any:
        return (self.conv_state, self.recurrent_state, self.offset)

    def restore(self, snapshot: Any) -> None:
        self.conv_state, self.recurrent_state, self.offset = snapshot

    @property
    def state(self) -> list[mx.array]:
        if self.conv_state is None:
            return []
        return [self.conv_state, self.recurrent_state]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        self.conv_state, self.recurrent_state = arrays if arrays else (None, None)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


Cache = KVCache | GDNCache


def buffers(cache: list[Cache]) -> list[mx.array]:
    """The arrays a step writes into a model cache (whole KV buffers, not views of their filled rows): what to
    evaluate after a step without adding graph nodes, and what a compiled step's trace depends on."""
    out: list[mx.array] = []
    for c in cache:
        if isinstance(c, QuantizedKVCache):
            out += [a for store in (c.keys, c.values) if store is not None for a in store]
        elif isinstance(c, KVCache):
            out += [a for a in (c.keys, c.values) if a is not None]
        else:
            out += c.state
    return out


@contextmanager
def recording_steps(cache: list[Cache]) -> Iterator[None]:
    """Inside, every GDN layer's forward keeps its per-token states (see `GDNCache.keep`)."""
    gdn = [c for c in cache if isinstance(c, GDNCache)]
    for c in gdn:
        c.record_steps = True
    try:
        yield
    finally:
        for c in gdn:
            c.record_steps = False


def keep_tokens(cache: list[Cache], forward_len: int, n: int) -> None:
    """Keep the first n (>= 1) of the `forward_len` tokens the last forward fed (recorded by `recording_steps`):
    KV caches are truncated, GDN states taken from the step after token n. Nothing is recomputed."""
    for c in cache:
        if isinstance(c, GDNCache):
            c.keep(n)
        else:
            c.restore(c.offset - (forward_len - n))


@contextmanager
def atomic(cache: list[Cache]) -> Iterator[list[Any]]:
    """Inside, any interruption (Ctrl-C, an error while building a step) puts `cache` back as it was; yields the
    snapshot taken on entry."""
    before = snapshot(cache)
    try:
        yield before
    except BaseException:
        restore(cache, before)
        raise


def snapshot(cache: list[Cache]) -> list[Any]:
    """A restorable copy of a whole model cache (see `restore`)."""
    return [c.snapshot() for c in cache]


def restore(cache: list[Cache], snap: list[Any]) -> None:
    if len(snap) != len(cache):
        raise ValueError(f"snapshot has {len(snap)} layers, cache has {len(cache)}")
    for c, s in zip(cache, snap):
        c.restore(s)
