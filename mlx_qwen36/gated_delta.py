"""Gated DeltaNet (`linear_attn`): causal depthwise conv, grouped q/k heads, and the gated delta rule.

Three implementations of the same rule, chosen by `GatedDeltaNet` per call:

- `gated_delta_recurrence`: the pure-MLX reference, one token at a time. Every faster path is tested against it;
  short prompts (T <= CHUNK_THRESHOLD) use it.
- `gated_delta_chunked`: the chunk-parallel form for prefill (WY/UT transform, Yang et al. 2024, "Gated Delta
  Networks"): within a chunk everything is matmuls, and the fp32 state is carried across chunks.
- `gated_delta_step`: one decode token with the state read once by a matmul and updated by one fused expression.

On Metal, `mx.fast.gated_delta_update` has real kernels for Qwen3.6's head layout and is used instead where it
covers the case (`metal_kernel_covers`); on CPU and CUDA it is an ops loop slower than the paths here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .cache import GDNCache
from .config import TextConfig
from .fast import stored_transpose, worker_stream
from .norms import RMSNormGated


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    # eps inside the sum, as the reference (not a clamp on the norm).
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def expand_heads(x: mx.array, groups: int) -> mx.array:
    """[B, T, Hk, D] -> [B, T, Hk*groups, D] by repeat-interleave: value head j reads key head j // groups.

    Not tiling (j % Hk): consecutive value heads share one key head.
    """
    return mx.repeat(x, groups, axis=2)


def gated_delta_recurrence(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """The gated delta rule, one token at a time, all fp32.

    q, k: [B, T, Hv, Dk] (already grouped, normalised, q scaled); v: [B, T, Hv, Dv]; g, beta: [B, T, Hv];
    state: [B, Hv, Dk, Dv]. Returns o [B, T, Hv, Dv] and the final state.
    For each t: S = S·exp(g_t); S += k_t ⊗ β_t (v_t − k_tᵀS); o_t = q_tᵀS (read after the update).
    """
    outputs = []
    for t in range(q.shape[1]):
        state = state * mx.exp(g[:, t])[..., None, None]
        k_t = k[:, t, :, :, None]  # [B, Hv, Dk, 1]
        kv_mem = (state * k_t).sum(axis=-2)  # [B, Hv, Dv]
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        state = state + k_t * delta[:, :, None, :]
        outputs.append((state * q[:, t, :, :, None]).sum(axis=-2))
    return mx.stack(outputs, axis=1), state


CHUNK_SIZE = 64  # tokens per chunk of the chunk-parallel form (a power of two)
CPU_CHUNK_SIZE = 16  # on the CPU back end, whose small batched matmuls favour short chunks (16 beat 32 and 64)
CHUNK_THRESHOLD = 16  # prompts longer than this take the chunked path (as mx.fast.gated_delta_update does)


def gated_delta_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """One decode token: `gated_delta_recurrence` for T = 1, reading ungrouped q, k [B, 1, Hk, Dk] (Hk divides Hv;
    value head j reads key head j // (Hv/Hk), as `expand_heads`) against the state viewed [B, Hk, Hv/Hk, Dk, Dv].

    The state is read and written by one matmul and one fused update each: kᵀ(d·S) = d·(kᵀS) with d = exp(g), so
    S' = d·S + k⊗δ with δ = β(v − d·kᵀS), and o = qᵀS'.
    """
    B, _, Hk, Dk = k.shape
    _, _, Hv, Dv = v.shape
    G = Hv // Hk
    S = state.reshape(B, Hk, G, Dk, Dv)
    q, k = q.reshape(B, Hk, 1, 1, Dk), k.reshape(B, Hk, 1, 1, Dk)  # one row per key head, shared by its group
    d = mx.exp(g).reshape(B, Hk, G, 1, 1)
    delta = beta.reshape(B, Hk, G, 1, 1) * (v.reshape(B, Hk, G, 1, Dv) - d * (k @ S))  # [B, Hk, G, 1, Dv]
    S = d * S + k.swapaxes(-1, -2) * delta
    return (q @ S).reshape(B, 1, Hv, Dv), S.reshape(B, Hv, Dk, Dv)


def segsum(g: mx.array) -> mx.array:
    """[..., C] log decays -> [..., C, C] with Σ_{j<m<=i} g_m at (i, j) for i >= j and -inf above the diagonal.

    Summed per pair rather than as a difference of cumulative sums, which loses precision once the cumulative
    log decay is large.
    """
    C = g.shape[-1]
    rows = mx.arange(C)[:, None]
    cols = mx.arange(C)[None, :]
    x = mx.where(rows > cols, g[..., :, None], 0.0)  # x[m, j] = g_m for m > j
    return mx.where(rows >= cols, mx.cumsum(x, axis=-2), -mx.inf)


def unit_lower_inverse(a: mx.array) -> mx.array:
    """(I + A)⁻¹ for strictly lower-triangular A [..., C, C] (C a power of two), by block doubling.

    inv([[A11, 0], [A21, A22]]) = [[X11, 0], [-X22·A21·X11, X22]]: starting from the 1x1 diagonal blocks, each
    round joins neighbouring diagonal blocks with two batched matmuls, so C = 64 takes 6 rounds.
    """
    *batch, C, _ = a.shape
    x = mx.ones((*batch, C, 1, 1), dtype=a.dtype)  # inverses of the diagonal blocks of size b = 1
    b = 1
    while b < C:
        pairs = C // (2 * b)
        blocks = a.reshape(*batch, pairs, 2 * b, pairs, 2 * b)
        diag = mx.moveaxis(mx.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., pairs, 2b, 2b]
        x = x.reshape(*batch, pairs, 2, b, b)
        x11, x22 = x[..., 0, :, :], x[..., 1, :, :]
        x21 = -(x22 @ diag[..., b:, :b] @ x11)
        top = mx.concatenate([x11, mx.zeros_like(x11)], axis=-1)
        x = mx.concatenate([top, mx.concatenate([x21, x22], axis=-1)], axis=-2)
        b *= 2
    return x.reshape(*batch, C, C)


def _chunks(x: mx.array, C: int) -> mx.array:
    """[B, T, H, ...] with T a multiple of C -> [B, H, T/C, C, ...]."""
    B, T, H = x.shape[:3]
    return mx.moveaxis(x.reshape(B, T // C, C, H, *x.shape[3:]), 3, 1)


def gated_delta_chunked(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[mx.array, mx.array]:
    """The gated delta rule chunk-parallel (WY/UT form), equal to `gated_delta_recurrence`; same shapes, fp32.

    Within a chunk of C tokens, with Γ(i, j) = exp(Σ_{j<m<=i} g_m) and A = strictly-lower(diag(β)·K·Kᵀ ⊙ Γ), the
    UT transform T = (I + A)⁻¹ turns the C sequential rank-1 updates into
        W = T·(diag(β)·exp(G)·K)   [C, Dk]    U = T·(diag(β)·V)   [C, Dv]
    so for the chunk-start state S:  V' = U − W·S,  O = exp(G)·Q·S + (Q·Kᵀ ⊙ Γ)·V',
    S_next = exp(G_C)·S + (exp(G_C − G)·K)ᵀ·V'  (G the cumulative log decay inside the chunk).
    Only the last three lines run chunk after chunk; everything else is batched over all chunks.
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())  # short inputs: one chunk, a power of two >= T
    pad = -T % C
    if pad:
        q, k, v = (mx.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
        g, beta = (mx.pad(x, [(0, 0), (0, pad), (0, 0)]) for x in (g, beta))  # g = 0, β = 0: no effect
    q, k, v = _chunks(q, C), _chunks(k, C), _chunks(v, C)  # [B, H, n, C, D]
    g, beta = _chunks(g, C), _chunks(beta, C)  # [B, H, n, C]
    n = q.shape[2]

    seg = segsum(g)  # [B, H, n, C, C]
    decay = mx.exp(seg)  # Γ, zero above the diagonal
    G = mx.cumsum(g, axis=-1)  # [B, H, n, C]
    kT = mx.contiguous(k.swapaxes(-1, -2))  # [B, H, n, Dk, C]
    kb = k * beta[..., None]
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    a = mx.where(strict, (kb @ kT) * decay, 0.0)
    t = unit_lower_inverse(a)  # [B, H, n, C, C]
    wu = t @ mx.concatenate([kb * mx.exp(G)[..., None], v * beta[..., None]], axis=-1)
    u = wu[..., Dk:]  # [B, H, n, C, Dv]
    # One matmul per chunk reads the state for both W·S and exp(G)·Q·S.
    reads = mx.concatenate([wu[..., :Dk], q * mx.exp(G)[..., None]], axis=-2)  # [B, H, n, 2C, Dk]
    qk = (q @ kT) * decay  # [B, H, n, C, C]
    k_out = mx.contiguous((k * mx.exp(seg[..., -1, :])[..., None]).swapaxes(-1, -2))  # [B, H, n, Dk, C]
    chunk_decay = mx.exp(G[..., -1])[..., None, None]  # [B, H, n, 1, 1]

    outs = []
    for c in range(n):
        r = reads[:, :, c] @ state  # [B, H, 2C, Dv]
        v_new = u[:, :, c] - r[:, :, :C]
        outs.append(r[:, :, C:] + qk[:, :, c] @ v_new)
        state = chunk_decay[:, :, c] * state + k_out[:, :, c] @ v_new
    o = mx.stack(outs, axis=2)  # [B, H, n, C, Dv]
    o = mx.moveaxis(o, 1, 3).reshape(B, n * C, H, Dv)
    return o[:, :T], state


def metal_kernel_covers(q: mx.array, v: mx.array) -> bool:
    """Whether `mx.fast.gated_delta_update` runs a real kernel here: Metal only, Dk = Dv = 128, and the (Hk, Hv)
    pairs its kernels are built for (Qwen3.6's linear layers are (16, 32)). Elsewhere it is an ops loop."""
    if mx.default_device() != mx.gpu or not mx.metal.is_available():
        return False
    Hk, Dk = q.shape[-2:]
    Hv, Dv = v.shape[-2:]
    return Dk == Dv == 128 and (Hk, Hv) in {(24, 24), (32, 32), (16, 32), (16, 48)}


def gated_delta_metal(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """`mx.fast.gated_delta_update` with our layouts: q, k ungrouped [B, T, Hk, Dk]; its state is [B, Hv, Dv, Dk]."""
    o, state = mx.fast.gated_delta_update(q, k, v, mx.exp(g), beta, state.swapaxes(-1, -2))
    return o, state.swapaxes(-1, -2)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_k_heads = cfg.linear_num_key_heads
        self.num_v_heads = cfg.linear_num_value_heads
        self.head_k_dim = cfg.linear_key_head_dim
        self.head_v_dim = cfg.linear_value_head_dim
        self.key_dim = cfg.linear_key_dim
        self.value_dim = cfg.linear_value_dim
        self.conv_dim = cfg.linear_conv_dim
        self.conv_kernel = cfg.linear_conv_kernel_dim
        hidden = cfg.hidden_size

        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)
        # Depthwise: MLX layout [C, K, 1]; tap K-1 multiplies the current token.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = mx.ones((self.num_v_heads,), dtype=mx.float32)
        self.A_log = mx.zeros((self.num_v_heads,), dtype=mx.float32)
        self.norm = RMSNormGated(self.head_v_dim, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def _conv(self, mixed: mx.array, cache: GDNCache | None) -> mx.array:
        B, T, C = mixed.shape
        past = cache.conv_state if cache is not None else None
        if past is None:
            past = mx.zeros((B, self.conv_kernel - 1, C), dtype=mixed.dtype)
        window = mx.concatenate([past, mixed], axis=1)  # [B, K-1+T, C]
        if cache is not None:
            cache.conv_state = window[:, -(self.conv_kernel - 1) :]
        return nn.silu(mx.conv1d(window, self.conv1d.weight, groups=C))

    def __call__(self, x: mx.array, cache: GDNCache | None = None) -> mx.array:
        B, T, _ = x.shape
        if T == 1:
            return self.decode(x.reshape(B, -1), cache)[:, None]
        mixed = self._conv(self.in_proj_qkv(x), cache)
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim)

        q, k, v = mx.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim).astype(mx.float32)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim).astype(mx.float32)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim).astype(mx.float32)
        q = l2norm(q) * (self.head_k_dim**-0.5)
        k = l2norm(k)
        g, beta = self._gates(self.in_proj_a(x), self.in_proj_b(x))

        o = self._update_state(q, k, v, g, beta, cache)
        o = self.norm(o.astype(x.dtype), z)
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def decode(self, x: mx.array, cache: GDNCache | None) -> mx.array:
        """One token per row, x [B, H] -> [B, H]: the same maths in fewer ops. The conv is a multiply-sum over the
        K-row window (a depthwise conv1d costs ~10x more for one row on CPU); q and k are normalised together."""
        B = x.shape[0]
        past = cache.conv_state if cache is not None else None
        if past is None:
            past = mx.zeros((B, self.conv_kernel - 1, self.conv_dim), dtype=x.dtype)
        window = mx.concatenate([past, self.in_proj_qkv(x)[:, None]], axis=1)  # [B, K, C]
        if cache is not None:
            cache.conv_state = window[:, 1:]
        taps = stored_transpose(self.conv1d)  # [1, K, C]
        if taps is None:
            taps = self.conv1d.weight.swapaxes(0, 2)  # [C, K, 1] -> [1, K, C]
        mixed = nn.silu((window * taps).sum(axis=1, keepdims=True))  # [B, 1, C]

        qk, v = mx.split(mixed, [2 * self.key_dim], axis=-1)
        qk = qk.reshape(B, 2, self.num_k_heads, self.head_k_dim).astype(mx.float32)
        qk = l2norm(qk) * mx.array([[[self.head_k_dim**-0.5]], [[1.0]]])  # scales q only
        q, k = mx.split(qk, 2, axis=1)  # [B, 1, Hk, Dk]
        v = v.reshape(B, 1, self.num_v_heads, self.head_v_dim).astype(mx.float32)
        g, beta = self._gates(self.in_proj_a(x), self.in_proj_b(x))  # [B, Hv]

        o = self._update_state(q, k, v, g, beta, cache)  # [B, 1, Hv, Dv]
        z = self.in_proj_z(x).reshape(B, 1, self.num_v_heads, self.head_v_dim)
        o = self.norm(o.astype(x.dtype), z)
        return self.out_proj(o.reshape(B, self.value_dim))

    def _gates(self, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        """Log decay g = -exp(A_log)·softplus(a + dt_bias) and write strength β = sigmoid(b), both fp32."""
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias)
        return g, mx.sigmoid(b.astype(mx.float32))

    def _update_state(self, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                      cache: GDNCache | None) -> mx.array:
        B = q.shape[0]
        state = cache.recurrent_state if cache is not None else None
        if state is None:
            state = mx.zeros((B, self.num_v_heads, self.head_k_dim, self.head_v_dim), dtype=mx.float32)
        o, state = self._delta_rule(q, k, v, g, beta, state)
        if cache is not None:
            cache.recurrent_state = state
            cache.offset += q.shape[1]
        return o

    def _delta_rule(
        self, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
    ) -> tuple[mx.array, mx.array]:
        """q, k [B, T, Hk, Dk] (normalised, ungrouped) -> o [B, T, Hv, Dv] and the new state, by the cheapest path."""
        if metal_kernel_covers(q, v):
            return gated_delta_metal(q, k, v, g, beta, state)
        T = q.shape[1]
        if T == 1:
            return gated_delta_step(q, k, v, g, beta, state)
        groups = self.num_v_heads // self.num_k_heads
        q, k = expand_heads(q, groups), expand_heads(k, groups)
        if T <= CHUNK_THRESHOLD:
            return gated_delta_recurrence(q, k, v, g, beta, state)
        chunk = CPU_CHUNK_SIZE if mx.default_device() == mx.cpu else CHUNK_SIZE
        return split_heads(partial(gated_delta_chunked, chunk_size=chunk), q, k, v, g, beta, state)


def split_heads(rule: Callable, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                state: mx.array) -> tuple[mx.array, mx.array]:
    """`rule` on each half of the (independent) heads, the halves on two CPU threads when there are two."""
    stream = worker_stream()
    H = v.shape[2]
    if stream is None or H % 2:
        return rule(q, k, v, g, beta, state)
    h = H // 2
    first = rule(q[:, :, :h], k[:, :, :h], v[:, :, :h], g[..., :h], beta[..., :h], state[:, :h])
    with mx.stream(stream):
        second = rule(q[:, :, h:], k[:, :, h:], v[:, :, h:], g[..., h:], beta[..., h:], state[:, h:])
    return mx.concatenate([first[0], second[0]], axis=2), mx.concatenate([first[1], second[1]], axis=1)
