"""One decoder block: a token mixer (GDN or gated attention) and an FFN (MoE or dense), both pre-norm."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import GatedAttention
from .cache import Cache
from .config import TextConfig
from .gated_delta import GatedDeltaNet
from .moe import MLP, SparseMoeBlock
from .norms import RMSNorm


def make_ffn(cfg: TextConfig) -> nn.Module:
    return SparseMoeBlock(cfg) if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)


class DecoderLayer(nn.Module):
    """h = x + mixer(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: TextConfig, layer_type: str):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = make_ffn(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Cache | None = None, position_ids: mx.array | None = None) -> mx.array:
        B, T, H = x.shape
        if T == 1 and position_ids is None:
            return self.decode(x.reshape(B, H), cache).reshape(B, 1, H)
        h = self.input_layernorm(x)
        if self.is_linear:
            h = self.linear_attn(h, cache)
        else:
            h = self.self_attn(h, cache, position_ids)
        h = x + h
        return self.mlp(self.post_attention_layernorm(h), residual=h)

    def decode(self, x: mx.array, cache: Cache | None = None) -> mx.array:
        """One token per row at the cache position, x [B, H] -> [B, H] (the mixers' decode forms; each skip
        connection is added by the launch that ends its branch)."""
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = mixer.decode(self.input_layernorm(x), cache, residual=x)
        return self.mlp(self.post_attention_layernorm(h), residual=h)
