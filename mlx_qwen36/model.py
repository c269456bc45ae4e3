"""The Qwen3.6 text decoder: [GDN, GDN, GDN, gated attention] blocks, each pre-norm with an MoE or dense FFN."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache, GDNCache, KVCache
from .config import ModelConfig, TextConfig
from .decoder import DecoderLayer
from .mtp import MTP
from .norms import RMSNorm

DEFAULT_PREFILL_CHUNK = 512


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, t) for t in cfg.layer_types]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(
        self,
        input_ids: mx.array,
        cache: list[Cache] | None = None,
        position_ids: mx.array | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = self.embed_tokens(input_ids) if input_embeddings is None else input_embeddings
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c, position_ids)
        return self.norm(h)


class Model(nn.Module):
    """`logits = model(input_ids [B, T] int32, cache=cache)` -> [B, T, vocab]."""

    def __init__(self, config: ModelConfig, mtp_layers: int = 0):
        super().__init__()
        self.config = config
        cfg = config.text
        self.model = TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if mtp_layers:
            self.mtp = MTP(cfg, mtp_layers)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def logits(self, hidden: mx.array) -> mx.array:
        if self.config.text.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: mx.array,
        cache: list[Cache] | None = None,
        position_ids: mx.array | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        return self.logits(self.model(input_ids, cache, position_ids, input_embeddings))

    def make_cache(self) -> list[Cache]:
        return [GDNCache() if layer.is_linear else KVCache() for layer in self.layers]

    def prefill(self, input_ids: mx.array, cache: list[Cache], chunk_size: int = DEFAULT_PREFILL_CHUNK) -> mx.array:
        """Run a prompt through the cache in chunks; returns the last position's logits [B, vocab].

        Each chunk's cache is evaluated before the next, so memory is bounded by the chunk, not the prompt.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        T = input_ids.shape[1]
        if T == 0:
            raise ValueError("prefill needs at least one token")
        for start in range(0, T - 1, chunk_size):
            end = min(start + chunk_size, T - 1)
            self.model(input_ids[:, start:end], cache)
            mx.eval([c.state for c in cache])
        return self(input_ids[:, -1:], cache)[:, -1]
