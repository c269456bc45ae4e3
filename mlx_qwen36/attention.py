"""Gated attention (`self_attn`): GQA with zero-centred q/k norms, partial rotary and a sigmoid output gate."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import TextConfig
from .norms import RMSNorm
from .ops import attention, projections, rotary_decode
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
        if T == 1 and position_ids is None:
            return self.decode(x.reshape(B, -1), cache)[:, None]
        q, gate = split_query_gate(self.q_proj(x), self.head_dim)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset, position_ids)
        k = self.rope(k, offset, position_ids)
        o = self.attend(q, k, v, cache).transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(o * mx.sigmoid(gate.reshape(B, T, -1)))

    def decode(self, x: mx.array, cache: KVCache | None, residual: mx.array | None = None) -> mx.array:
        """One token per row at the cache position, x [B, H] -> [B, H] (plus `residual`, added in o_proj's launch):
        the same maths on [B, heads, 1, D] rows. It is three steps so that the compiled decode step (`fast`) can
        trace the projections around the attention core, whose shapes grow with the cache."""
        q, k, v, gate = self.decode_qkv(x, cache.offset if cache is not None else 0)
        return self.decode_out(self.attend(q, k, v, cache), gate, residual)

    def decode_qkv(self, x: mx.array, position: int | mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """x [B, H] at `position` (an int, or [B] per row) -> rotated q [B, heads, 1, D], k and v [B, kv heads,
        1, D], and the output gate [B, heads * D]."""
        B = x.shape[0]
        qg, k, v = projections(x, [self.q_proj, self.k_proj, self.v_proj])
        q, gate = mx.split(qg.reshape(B, self.num_heads, 2 * self.head_dim), 2, axis=-1)  # as split_query_gate
        q = self.q_norm(q).reshape(B, self.num_heads, 1, self.head_dim)
        k = self.k_norm(k.reshape(B, self.num_kv_heads, 1, self.head_dim))
        v = v.reshape(B, self.num_kv_heads, 1, self.head_dim)
        q, k = rotary_decode(q, k, position, self.rope)
        return q, k, v, gate.reshape(B, -1)

    def decode_out(self, o: mx.array, gate: mx.array, residual: mx.array | None = None) -> mx.array:
        """Attention output o [B, heads, 1, D] -> [B, H] through the sigmoid gate and o_proj (+ residual)."""
        return projections(o.reshape(o.shape[0], -1), [self.o_proj], gate=gate, residual=residual)[0]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | None) -> mx.array:
        """q [B, heads, T, D] and this step's rotated k, v [B, kv heads, T, D] -> [B, heads, T, D] over the cache."""
        T = q.shape[2]
        if cache is not None:
            k, v = cache.update(k, v)
        # "causal" aligns the mask bottom-right, so a chunk after a cached prefix sees the whole prefix.
        mask = cache.attention_mask(T) if cache is not None else ("causal" if T > 1 else None)
        return attention(q, k, v, self.scale, mask)
