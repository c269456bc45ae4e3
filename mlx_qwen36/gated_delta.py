"""Gated DeltaNet (`linear_attn`): causal depthwise conv, grouped q/k heads, and the gated delta rule.

The layer holds the weights and the projections; everything between the projections and `out_proj` (conv, SiLU,
q/k norms, gates, the recurrence and the gated output norm) is one op, `ops.gated_delta_mixer`, which runs as a
single Metal kernel where it can and as the pure-MLX reference elsewhere.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import GDNCache
from .config import TextConfig
from .norms import RMSNormGated
from .ops import GDNDims, gated_delta_mixer, projections


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
        self.dims = GDNDims(self.num_k_heads, self.head_k_dim, self.num_v_heads, self.head_v_dim, self.conv_kernel,
                            cfg.rms_norm_eps)
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

    def __call__(self, x: mx.array, cache: GDNCache | None = None, mask: mx.array | None = None) -> mx.array:
        """x [B, T, hidden] -> [B, T, hidden]; `mask` [B, T] marks real tokens (False: padding, see the op)."""
        qkv, z, b, a = self.in_projections(x)
        return self.out_proj(self.mix(qkv, a, b, z, cache, mask))

    def decode(self, x: mx.array, cache: GDNCache | None, residual: mx.array | None = None) -> mx.array:
        """One token per row, x [B, H] -> [B, H] (plus `residual`, added in out_proj's launch)."""
        B = x.shape[0]
        qkv, z, b, a = self.in_projections(x[:, None])
        y = self.mix(qkv, a, b, z, cache).reshape(B, self.value_dim)
        return projections(y, [self.out_proj], residual=residual)[0]

    def in_projections(self, x: mx.array) -> list[mx.array]:
        """qkv, z, b, a of x [B, T, H]: one launch for a few tokens of a quantized model."""
        return projections(x, [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a])

    def mix(self, qkv: mx.array, a: mx.array, b: mx.array, z: mx.array, cache: GDNCache | None,
            mask: mx.array | None = None) -> mx.array:
        """The op between the projections and out_proj, reading and updating the cache's states."""
        record = cache is not None and cache.record_steps
        out = gated_delta_mixer(self.dims, qkv, a, b, z, self.conv1d.weight, self.A_log, self.dt_bias,
                                self.norm.weight, cache.conv_state if cache is not None else None,
                                cache.recurrent_state if cache is not None else None, mask, step_states=record)
        if cache is not None:
            cache.conv_state, cache.recurrent_state = out.conv_state, out.state
            cache.offset += qkv.shape[1]
            cache.steps = (out.conv_steps, out.state_steps) if record else None
        return out.y
