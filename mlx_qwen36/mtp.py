"""The multi-token-prediction head: one extra full-attention decoder layer that drafts token i+2.

It shares the main model's embedding and lm_head. Inputs follow vLLM's `Qwen3_5MultiTokenPredictor`: the main
model's final-norm hidden state at position i and the embedding of token i+1, each normed, concatenated
embedding-first and projected back to the hidden size.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import TextConfig
from .decoder import DecoderLayer
from .norms import RMSNorm


class MTP(nn.Module):
    def __init__(self, cfg: TextConfig, num_layers: int = 1):
        super().__init__()
        self.pre_fc_norm_embedding = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = [DecoderLayer(cfg, "full_attention") for _ in range(num_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def __call__(
        self, hidden: mx.array, next_embeddings: mx.array, cache: list[KVCache] | None = None, step: int = 0,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        """hidden, next_embeddings: [B, T, H] -> the MTP's normed hidden state [B, T, H] (feed it to lm_head).

        `position_ids` [3, B, T]: the positions of `hidden`'s tokens (the main model's), needed once the MTP cache
        does not start at position 0 (speculative decoding fills it from where a turn's prompt is new)."""
        x = mx.concatenate([self.pre_fc_norm_embedding(next_embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1)
        i = step % len(self.layers)
        x = self.layers[i](self.fc(x), cache[i] if cache is not None else None, position_ids)
        return self.norm(x)
