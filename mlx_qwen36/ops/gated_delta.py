"""The Gated DeltaNet mixer as one op: conv, SiLU, q/k norms, gates, the gated delta rule and the gated RMSNorm.

`gated_delta_mixer` is the boundary the layer calls, at the fusion point: it takes the raw projections and the
states and returns the normalised output and the new states. Behind it:

- the Metal kernel `gdn_mixer` (metal/gdn_mixer.metal): everything in one launch, for decode, speculative
  verification (small T, optionally with the state after every step) and prefill;
- the pure-MLX reference, which picks the cheapest form of the delta rule per call:
  - `gated_delta_recurrence`: one token at a time. Every faster form is tested against it; short prompts
    (T <= CHUNK_THRESHOLD) and per-step states use it.
  - `gated_delta_chunked`: the chunk-parallel form for prefill (WY/UT transform, Yang et al. 2024, "Gated Delta
    Networks"): within a chunk everything is matmuls, and the fp32 state is carried across chunks, by a loop of
    matmuls or by the Metal kernel `gdn_chunk_scan` (all chunks in one launch), whichever is measured faster.
  - `gated_delta_step`: one decode token with the state read once by a matmul and updated by one fused expression.
  - on Metal, `mx.fast.gated_delta_update` where it has real kernels for the head layout (`metal_kernel_covers`);
    on CPU and CUDA it is an ops loop slower than the forms here.

The recurrent state is [B, Hv, Dv, Dk] fp32 at the boundary (the kernels' layout: a state column is contiguous);
the reference forms below compute on its [Dk, Dv] view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .cpu import worker_stream


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    # eps inside the sum, as the reference (not a clamp on the norm).
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def expand_heads(x: mx.array, groups: int) -> mx.array:
    """[B, T, Hk, D] -> [B, T, Hk*groups, D] by repeat-interleave: value head j reads key head j // groups.

    Not tiling (j % Hk): consecutive value heads share one key head.
    """
    return mx.repeat(x, groups, axis=2)


def gated_delta_recurrence(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array, keep_states: bool = False
) -> tuple[mx.array, ...]:
    """The gated delta rule, one token at a time, all fp32.

    q, k: [B, T, Hv, Dk] (already grouped, normalised, q scaled); v: [B, T, Hv, Dv]; g, beta: [B, T, Hv];
    state: [B, Hv, Dk, Dv]. Returns o [B, T, Hv, Dv] and the final state (and, with keep_states, the state after
    every step [B, T, Hv, Dk, Dv]).
    For each t: S = S·exp(g_t); S += k_t ⊗ β_t (v_t − k_tᵀS); o_t = q_tᵀS (read after the update).
    """
    outputs, states = [], []
    for t in range(q.shape[1]):
        state = state * mx.exp(g[:, t])[..., None, None]
        k_t = k[:, t, :, :, None]  # [B, Hv, Dk, 1]
        kv_mem = (state * k_t).sum(axis=-2)  # [B, Hv, Dv]
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        state = state + k_t * delta[:, :, None, :]
        outputs.append((state * q[:, t, :, :, None]).sum(axis=-2))
        states.append(state)
    if keep_states:
        return mx.stack(outputs, axis=1), state, mx.stack(states, axis=1)
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
    chunk_size: int = CHUNK_SIZE, scan: Callable | None = None,
) -> tuple[mx.array, mx.array]:
    """The gated delta rule chunk-parallel (WY/UT form), equal to `gated_delta_recurrence`; same shapes, fp32.

    Within a chunk of C tokens, with Γ(i, j) = exp(Σ_{j<m<=i} g_m) and A = strictly-lower(diag(β)·K·Kᵀ ⊙ Γ), the
    UT transform T = (I + A)⁻¹ turns the C sequential rank-1 updates into
        W = T·(diag(β)·exp(G)·K)   [C, Dk]    U = T·(diag(β)·V)   [C, Dv]
    so for the chunk-start state S:  V' = U − W·S,  O = exp(G)·Q·S + (Q·Kᵀ ⊙ Γ)·V',
    S_next = exp(G_C)·S + (exp(G_C − G)·K)ᵀ·V'  (G the cumulative log decay inside the chunk).
    Only those last three lines run chunk after chunk (`scan`: `chunk_scan_ops`, or the Metal kernel's
    `chunk_scan_kernel`); everything else is batched over all chunks.
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
    k_dec = k * mx.exp(seg[..., -1, :])[..., None]  # [B, H, n, C, Dk]
    o, state = (scan or chunk_scan_ops)(reads, u, qk, k_dec, mx.exp(G[..., -1]), state)  # o [B, H, n, C, Dv]
    o = mx.moveaxis(o, 1, 3).reshape(B, n * C, H, Dv)
    return o[:, :T], state


def chunk_scan_ops(reads: mx.array, u: mx.array, qk: mx.array, k_dec: mx.array, chunk_decay: mx.array,
                   state: mx.array) -> tuple[mx.array, mx.array]:
    """The chunks one after another in MLX ops (shapes in `gated_delta_chunked`; state [B, H, Dk, Dv])."""
    C = u.shape[-2]
    k_out = mx.contiguous(k_dec.swapaxes(-1, -2))  # [B, H, n, Dk, C]
    outs = []
    for c in range(u.shape[2]):
        r = reads[:, :, c] @ state  # [B, H, 2C, Dv]
        v_new = u[:, :, c] - r[:, :, :C]
        outs.append(r[:, :, C:] + qk[:, :, c] @ v_new)
        state = chunk_decay[:, :, c, None, None] * state + k_out[:, :, c] @ v_new
    return mx.stack(outs, axis=2), state


CHUNK_SCAN = kernels.Kernel("gdn_chunk_scan", ["reads", "u", "qk", "k_dec", "decay", "state"], ["o", "state_out"])


def chunk_scan_kernel(reads: mx.array, u: mx.array, qk: mx.array, k_dec: mx.array, chunk_decay: mx.array,
                      state: mx.array) -> tuple[mx.array, mx.array]:
    """`chunk_scan_ops` as one launch (metal/gdn_chunk_scan.metal): one threadgroup per (batch row, head)."""
    B, H, n, C, Dv = u.shape
    Dk = k_dec.shape[-1]
    nsg = simdgroups(Dv)
    o, state_out = CHUNK_SCAN(
        inputs=[reads, u, qk, k_dec, chunk_decay, state.swapaxes(-1, -2)],  # the state as [B, H, Dv, Dk]
        output_shapes=[(B, H, n, C, Dv), (B, H, Dv, Dk)], output_dtypes=[mx.float32, mx.float32],
        grid=(32 * nsg, 1, B * H), threadgroup=(32 * nsg, 1, 1),
        template=[("DK", Dk), ("DV", Dv), ("C", C), ("NSG", nsg)],
    )
    return o, state_out.swapaxes(-1, -2)


def chunk_scan_covers(q: mx.array, v: mx.array) -> bool:
    """The scan kernel's layout: whole SIMD-groups of key entries, value columns in fours, chunks of 32 rows or more
    (the chunk of a prompt of T > CHUNK_THRESHOLD tokens is min(CHUNK_SIZE, next power of two >= T))."""
    return q.shape[-1] % 32 == 0 and v.shape[-1] % 4 == 0 and CHUNK_SIZE % 32 == 0


def metal_kernel_covers(q: mx.array, v: mx.array) -> bool:
    """Whether `mx.fast.gated_delta_update` runs a real kernel here: Metal only, Dk = Dv = 128, and the (Hk, Hv)
    pairs its kernels are built for (Qwen3.6's linear layers are (16, 32)). Elsewhere it is an ops loop."""
    if not kernels.metal_graph():
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


# ---------------------------------------------------------------------------------------------------------------
# the op


@dataclass(frozen=True)
class GDNDims:
    num_k_heads: int
    head_k_dim: int
    num_v_heads: int
    head_v_dim: int
    conv_kernel: int
    eps: float

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.num_v_heads * self.head_v_dim


class GDNOutput(NamedTuple):
    y: mx.array  # [B, T, Hv * Dv], normalised and gated, in the activations' dtype
    conv_state: mx.array  # [B, K-1, conv_dim]
    state: mx.array  # [B, Hv, Dv, Dk] fp32
    conv_steps: mx.array | None  # [B, T, K-1, conv_dim]: the conv state after each step (step_states)
    state_steps: mx.array | None  # [B, T, Hv, Dv, Dk]: the recurrent state after each step (step_states)


def gated_delta_mixer(dims: GDNDims, qkv: mx.array, a: mx.array, b: mx.array, z: mx.array, conv_weight: mx.array,
                      A_log: mx.array, dt_bias: mx.array, norm_weight: mx.array, conv_state: mx.array | None,
                      state: mx.array | None, mask: mx.array | None = None,
                      step_states: bool = False) -> GDNOutput:
    """One GDN mixer over T tokens.

    qkv [B, T, conv_dim] is the pre-conv projection, a and b [B, T, Hv] the gate projections, z [B, T, Hv*Dv] the
    output gate; conv_weight [conv_dim, K, 1]; conv_state [B, K-1, conv_dim] and state [B, Hv, Dv, Dk] (None: zeros).
    mask [B, T] (bool, optional): a False step feeds a zero row to the conv, leaves the recurrent state unchanged
    and outputs 0 (padding of a batch). step_states also returns the states after every step, to roll back to.
    """
    B, T, C = qkv.shape
    Hv, Dk, Dv = dims.num_v_heads, dims.head_k_dim, dims.head_v_dim
    if conv_state is None:
        conv_state = mx.zeros((B, dims.conv_kernel - 1, C), dtype=qkv.dtype)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    args = (qkv, a, b, z, conv_weight, A_log, dt_bias, norm_weight, conv_state, state, mask)
    conv_steps = _conv_steps(dims, qkv, conv_state, mask) if step_states else None
    if not kernel_covers(dims, qkv):
        y, conv_state, state, state_steps = _reference(dims, step_states, *args)
    else:
        key = ("gdn_mixer", str(qkv.dtype), B, _t_bucket(T), Hv, Dk, Dv, mask is not None, step_states)
        y, conv_state, state, state_steps = kernels.dispatch(
            "gdn_mixer", key, partial(_kernel, dims, step_states), partial(_reference, dims, step_states), args)
    return GDNOutput(y, conv_state, state, conv_steps, state_steps)


def kernel_covers(dims: GDNDims, qkv: mx.array) -> bool:
    """The kernel's layout needs whole SIMD-groups of key entries and value columns in fours."""
    return (dims.head_k_dim % 32 == 0 and dims.head_v_dim % 4 == 0 and dims.num_v_heads % dims.num_k_heads == 0
            and mx.issubdtype(qkv.dtype, mx.floating))


def _t_bucket(T: int) -> int:
    """What the kernel's speed against the reference depends on: T itself up to the speculative sizes, then its
    power of two (the kernel's source does not depend on T, so nothing is compiled per prompt length)."""
    return T if T <= 8 else 1 << (T - 1).bit_length()


def _conv_steps(dims: GDNDims, qkv: mx.array, conv_state: mx.array, mask: mx.array | None) -> mx.array:
    """The conv state after each of the T steps: rows t+1 .. t+K-1 of [conv_state; qkv] -> [B, T, K-1, C]."""
    rows = qkv if mask is None else mx.where(mask[..., None], qkv, 0)
    window = mx.concatenate([conv_state, rows.astype(conv_state.dtype)], axis=1)
    K1 = dims.conv_kernel - 1
    return mx.stack([window[:, t + 1 : t + 1 + K1] for t in range(qkv.shape[1])], axis=1)


GDN_KERNEL = kernels.Kernel(
    "gdn_mixer",
    ["qkv", "a", "b_in", "z", "conv_state", "conv_w", "A_log", "dt_bias", "state", "norm_w", "mask", "eps"],
    ["y", "conv_out", "state_out", "steps"],
)


def simdgroups(head_v_dim: int) -> int:
    """SIMD-groups per threadgroup: each owns DV/NSG state columns, at least 4 and at most 32 x 32 threads."""
    return head_v_dim // max(4, head_v_dim // 32)


def _kernel(dims: GDNDims, step_states: bool, qkv, a, b, z, conv_weight, A_log, dt_bias, norm_weight, conv_state,
            state, mask) -> tuple:
    B, T, C = qkv.shape
    Hv, Dk, Dv, K = dims.num_v_heads, dims.head_k_dim, dims.head_v_dim, dims.conv_kernel
    nsg = simdgroups(Dv)
    y, conv_out, state_out, steps = GDN_KERNEL(
        inputs=[qkv, a, b, z, conv_state.astype(qkv.dtype), conv_weight.reshape(C, K), A_log, dt_bias,
                state, norm_weight, kernels.absent(mx.bool_) if mask is None else mask, dims.eps],
        output_shapes=[(B, T, Hv * Dv), (B, K - 1, C), (B, Hv, Dv, Dk), (B, T, Hv, Dv, Dk) if step_states else (1,)],
        output_dtypes=[qkv.dtype, qkv.dtype, mx.float32, mx.float32],
        grid=(32 * nsg, 1, B * Hv), threadgroup=(32 * nsg, 1, 1),
        template=[("InT", qkv.dtype), ("HK", dims.num_k_heads), ("DK", Dk), ("HV", Hv), ("DV", Dv), ("KC", K),
                  ("NSG", nsg), ("HAS_MASK", mask is not None), ("STEPS", step_states)],
    )
    return y, conv_out, state_out, steps if step_states else None


def _reference(dims: GDNDims, step_states: bool, qkv, a, b, z, conv_weight, A_log, dt_bias, norm_weight, conv_state,
               state, mask) -> tuple:
    """The mixer in MLX ops (what the kernel must compute), by the cheapest form of the delta rule."""
    B, T, C = qkv.shape
    Hk, Dk, Hv, Dv = dims.num_k_heads, dims.head_k_dim, dims.num_v_heads, dims.head_v_dim
    dtype = qkv.dtype
    if mask is not None:
        qkv = mx.where(mask[..., None], qkv, 0)
    window = mx.concatenate([conv_state.astype(dtype), qkv], axis=1)  # [B, K-1+T, C]
    new_conv = window[:, -(dims.conv_kernel - 1):]
    if T == 1:  # a multiply-sum over the K-row window: a depthwise conv1d costs ~10x more for one row on CPU
        mixed = nn.silu((window * conv_weight.swapaxes(0, 2)).sum(axis=1, keepdims=True))  # taps [1, K, C]
    else:
        mixed = nn.silu(mx.conv1d(window, conv_weight, groups=C))
    qk, v = mx.split(mixed, [2 * dims.key_dim], axis=-1)
    qk = qk.reshape(B, T, 2, Hk, Dk).astype(mx.float32)
    qk = l2norm(qk) * mx.array([[[Dk**-0.5]], [[1.0]]])  # scales q only
    q, k = qk[:, :, 0], qk[:, :, 1]  # [B, T, Hk, Dk]
    v = v.reshape(B, T, Hv, Dv).astype(mx.float32)
    g, beta = gates(a, b, A_log, dt_bias)
    if mask is not None:
        g, beta = mx.where(mask[..., None], g, 0.0), mx.where(mask[..., None], beta, 0.0)

    state_kv = state.swapaxes(-1, -2)  # [B, Hv, Dk, Dv]: the layout of the forms below
    steps = None
    if step_states:
        G = Hv // Hk
        o, state_kv, steps = gated_delta_recurrence(expand_heads(q, G), expand_heads(k, G), v, g, beta, state_kv,
                                                    keep_states=True)
        steps = steps.swapaxes(-1, -2)
    else:
        o, state_kv = delta_rule(q, k, v, g, beta, state_kv)

    o = mx.fast.rms_norm(o.astype(dtype), norm_weight, dims.eps)
    y = (o * nn.silu(z.reshape(B, T, Hv, Dv).astype(mx.float32))).astype(dtype).reshape(B, T, Hv * Dv)
    if mask is not None:
        y = mx.where(mask[..., None], y, 0)
    return y, new_conv, state_kv.swapaxes(-1, -2), steps


def gates(a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array) -> tuple[mx.array, mx.array]:
    """Log decay g = -exp(A_log)·softplus(a + dt_bias) and write strength β = sigmoid(b), both fp32."""
    g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + dt_bias.astype(mx.float32))
    return g, mx.sigmoid(b.astype(mx.float32))


def delta_rule(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
               state: mx.array) -> tuple[mx.array, mx.array]:
    """q, k [B, T, Hk, Dk] (normalised, ungrouped), state [B, Hv, Dk, Dv] -> o [B, T, Hv, Dv] and the new state, by
    the cheapest form: for a prompt, the chunk-parallel form with its sequential part as one Metal kernel where
    that is on and measured faster than the reference's form here (on Metal, `mx.fast.gated_delta_update`)."""
    B, T, Hk, Dk = q.shape
    if T > CHUNK_THRESHOLD and chunk_scan_covers(q, v):
        key = ("gdn_chunk_scan", B, _t_bucket(T), Hk, v.shape[2], Dk, v.shape[-1])
        return kernels.dispatch("gdn_chunk_scan", key, _chunked_with_kernel, _delta_rule_reference,
                                (q, k, v, g, beta, state))
    return _delta_rule_reference(q, k, v, g, beta, state)


def _chunked_with_kernel(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                         state: mx.array) -> tuple[mx.array, mx.array]:
    groups = v.shape[2] // q.shape[2]
    return gated_delta_chunked(expand_heads(q, groups), expand_heads(k, groups), v, g, beta, state,
                               chunk_size=CHUNK_SIZE, scan=chunk_scan_kernel)


def _delta_rule_reference(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                          state: mx.array) -> tuple[mx.array, mx.array]:
    if metal_kernel_covers(q, v):
        return gated_delta_metal(q, k, v, g, beta, state)
    T = q.shape[1]
    if T == 1:
        return gated_delta_step(q, k, v, g, beta, state)
    groups = v.shape[2] // q.shape[2]
    q, k = expand_heads(q, groups), expand_heads(k, groups)
    if T <= CHUNK_THRESHOLD:
        return gated_delta_recurrence(q, k, v, g, beta, state)
    chunk = CPU_CHUNK_SIZE if mx.default_device() == mx.cpu else CHUNK_SIZE
    return split_heads(partial(gated_delta_chunked, chunk_size=chunk), q, k, v, g, beta, state)
