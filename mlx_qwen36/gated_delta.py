"""Gated DeltaNet (`linear_attn`): causal depthwise conv, grouped q/k heads, and the gated delta rule.

The recurrence here is the pure-MLX reference every faster path (chunked prefill, Metal kernels) is tested against.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import GDNCache
from .config import TextConfig
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
        mixed = self._conv(self.in_proj_qkv(x), cache)
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim)
        b, a = self.in_proj_b(x), self.in_proj_a(x)

        q, k, v = mx.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        groups = self.num_v_heads // self.num_k_heads
        q = expand_heads(q.reshape(B, T, self.num_k_heads, self.head_k_dim), groups).astype(mx.float32)
        k = expand_heads(k.reshape(B, T, self.num_k_heads, self.head_k_dim), groups).astype(mx.float32)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim).astype(mx.float32)
        q = l2norm(q) * (self.head_k_dim**-0.5)
        k = l2norm(k)

        beta = mx.sigmoid(b.astype(mx.float32))
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias)

        state = cache.recurrent_state if cache is not None else None
        if state is None:
            state = mx.zeros((B, self.num_v_heads, self.head_k_dim, self.head_v_dim), dtype=mx.float32)
        o, state = gated_delta_recurrence(q, k, v, g, beta, state)
        if cache is not None:
            cache.recurrent_state = state
            cache.offset += T

        o = self.norm(o.astype(x.dtype), z)
        return self.out_proj(o.reshape(B, T, self.value_dim))
