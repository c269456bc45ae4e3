"""Gated attention (`self_attn`): GQA with zero-centred q/k norms, partial rotary and a sigmoid output gate."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import TextConfig
from .norms import RMSNorm
from .rope import Rotary


def split_query_gate(qg: mx.array, head_dim: int) -> tuple[mx.array, mx.array]:
    """q_proj output [B, T, heads * 2D] -> query, gate [B, T, heads, D].

    The rows are per-head interleaved: [h*2D, h*2D+D) is query head h and the next D rows are its gate, not
    all queries followed by all gates.
    """
    B, T, _ = qg.shape
    qg = qg.reshape(B, T, -1, 2 * head_dim)
    return qg[..., :head_dim], qg[..., head_dim:]


class GatedAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, 2 * self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.rope = Rotary(cfg)

    def __call__(
        self, x: mx.array, cache: KVCache | None = None, position_ids: mx.array | None = None
    ) -> mx.array:
        B, T, _ = x.shape
        q, gate = split_query_gate(self.q_proj(x), self.head_dim)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset, position_ids)
        k = self.rope(k, offset, position_ids)
        if cache is not None:
            k, v = cache.update(k, v)

        # "causal" aligns the mask bottom-right, so a chunk after a cached prefix sees the whole prefix.
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal" if T > 1 else None)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(o * mx.sigmoid(gate.reshape(B, T, -1)))
