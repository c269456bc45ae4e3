"""The Qwen3.6 text decoder: [GDN, GDN, GDN, gated attention] blocks, each pre-norm with an MoE or dense FFN.

With `vision=True` (and a `vision_config`) the model also holds the vision tower `visual`: images and videos are
encoded, scattered into the `<|image_pad|>` / `<|video_pad|>` rows of the token embeddings and placed with 3-D
M-RoPE positions (see `Model.prepare_inputs` and `positions.py`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import Cache, GDNCache, KVCache, QuantizedKVCache
from .config import ModelConfig, TextConfig
from .decoder import DecoderLayer
from .mtp import MTP
from .norms import RMSNorm
from .positions import get_rope_index
from .vision import VisionModel

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
    """`logits = model(input_ids [B, T] int32, cache=cache)` -> [B, T, vocab].

    Multimodal: `model(input_ids, pixel_values=..., image_grid_thw=..., pixel_values_videos=..., video_grid_thw=...)`
    (needs `vision=True`). To keep decoding after such a prompt, call `prepare_inputs` instead and keep its
    `rope_delta`: a later text token at cache index `i` has position `i + rope_delta` on all three axes, passed
    as `position_ids=positions.text_position_ids(i, T, rope_delta)`.
    """

    def __init__(self, config: ModelConfig, mtp_layers: int = 0, vision: bool = False):
        super().__init__()
        self.config = config
        cfg = config.text
        self.model = TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if mtp_layers:
            self.mtp = MTP(cfg, mtp_layers)
        if vision and config.vision is not None:
            self.visual = VisionModel(config.vision)

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
        pixel_values: mx.array | None = None,
        image_grid_thw: Any = None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw: Any = None,
    ) -> mx.array:
        if pixel_values is not None or pixel_values_videos is not None:
            embeds, positions, _ = self.prepare_inputs(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                       video_grid_thw, cache=cache, input_embeddings=input_embeddings)
            input_embeddings = embeds
            position_ids = positions if position_ids is None else position_ids
        return self.logits(self.model(input_ids, cache, position_ids, input_embeddings))

    @property
    def has_vision(self) -> bool:
        return "visual" in self

    def rope_deltas(self, input_ids: mx.array, image_grid_thw: Any = None, video_grid_thw: Any = None,
                    attention_mask: Any = None) -> mx.array:
        """rope_delta [B] of a prompt (no vision tower run): decode positions are `cache index + rope_delta`."""
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, self.config, attention_mask)[1]

    def prepare_inputs(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_grid_thw: Any = None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw: Any = None,
        cache: list[Cache] | None = None,
        rope_delta: int | mx.array = 0,
        input_embeddings: mx.array | None = None,
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(input_embeddings [B, T, H], position_ids [3, B, T], rope_delta [B]) for a prompt with images/videos.

        The vision features replace the `<|image_pad|>` / `<|video_pad|>` rows in order. When the prompt continues
        a cache (`cache` non-empty), positions start at `cache offset + rope_delta` (the delta of what the cache
        already holds), and the returned rope_delta covers the whole sequence. Feed the result in chunks with
        `model.model(input_ids[:, s:e], cache, position_ids[:, :, s:e], input_embeddings[:, s:e])` (or `prefill`).
        """
        if input_embeddings is None:
            input_embeddings = self.model.embed_tokens(input_ids)
        ids = np.asarray(input_ids)
        if pixel_values is not None or pixel_values_videos is not None:
            if not self.has_vision:
                raise ValueError("this model was built without its vision tower (text_only=True, or the checkpoint "
                                 "has no visual weights); it cannot take pixel_values")
            for pixels, grid, token, name in (
                (pixel_values, image_grid_thw, self.config.image_token_id, "image"),
                (pixel_values_videos, video_grid_thw, self.config.video_token_id, "video"),
            ):
                if pixels is None:
                    continue
                if grid is None:
                    raise ValueError(f"{name} pixel values were given without {name}_grid_thw")
                features = self.visual(pixels, grid)
                input_embeddings = scatter_features(input_embeddings, ids, token, features, name)
        positions, deltas = get_rope_index(ids, image_grid_thw, video_grid_thw, self.config)
        offset = cache_offset(cache)
        start = mx.array(rope_delta, dtype=mx.int32).reshape(-1) + offset
        positions = positions + start[None, :, None]
        return input_embeddings, positions, deltas + start - offset

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = 64) -> list[Cache]:
        """A fresh cache; `kv_bits` (4 or 8) stores the attention layers' keys and values quantized."""
        if kv_bits is not None and self.config.text.head_dim % kv_group_size:
            raise ValueError(f"kv_group_size {kv_group_size} does not divide head_dim {self.config.text.head_dim}")

        def kv() -> KVCache:
            return KVCache() if kv_bits is None else QuantizedKVCache(kv_bits, kv_group_size)

        return [GDNCache() if layer.is_linear else kv() for layer in self.layers]

    def prefill(self, input_ids: mx.array, cache: list[Cache], chunk_size: int = DEFAULT_PREFILL_CHUNK,
                input_embeddings: mx.array | None = None, position_ids: mx.array | None = None) -> mx.array:
        """Run a prompt through the cache in chunks; returns the last position's logits [B, vocab].

        Each chunk's cache is evaluated before the next, so memory is bounded by the chunk, not the prompt.
        `input_embeddings` [B, T, H] and `position_ids` [3, B, T] (from `prepare_inputs`) are sliced with the chunks.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        T = input_ids.shape[1]
        if T == 0:
            raise ValueError("prefill needs at least one token")

        def part(start: int, end: int) -> tuple[mx.array | None, mx.array | None]:
            emb = None if input_embeddings is None else input_embeddings[:, start:end]
            pos = None if position_ids is None else position_ids[:, :, start:end]
            return pos, emb

        for start in range(0, T - 1, chunk_size):
            end = min(start + chunk_size, T - 1)
            self.model(input_ids[:, start:end], cache, *part(start, end))
            mx.eval([c.state for c in cache])
        return self(input_ids[:, -1:], cache, *part(T - 1, T))[:, -1]


def cache_offset(cache: list[Cache] | None) -> int:
    """Tokens already in a model cache (0 for none)."""
    return int(cache[0].offset) if cache else 0


def scatter_features(embeddings: mx.array, ids: np.ndarray, token_id: int, features: mx.array, name: str) -> mx.array:
    """Replace, in order, the rows of `embeddings` [B, T, H] whose token is `token_id` with `features` [n, H]."""
    mask = ids == token_id
    n_tokens, n_features = int(mask.sum()), int(features.shape[0])
    if n_tokens != n_features:
        raise ValueError(f"{name} features and {name} tokens do not match: the prompt has {n_tokens} "
                         f"<|{name}_pad|> tokens but the {name} grids give {n_features} features")
    if n_tokens == 0:
        return embeddings
    B, T, H = embeddings.shape
    if features.shape[-1] != H:
        raise ValueError(f"{name} features have width {features.shape[-1]}, the text embeddings {H}")
    flat_mask = mask.reshape(-1)
    source = np.cumsum(flat_mask) - 1  # row of `features` for each masked position
    gathered = features.astype(embeddings.dtype)[mx.array(np.clip(source, 0, n_tokens - 1).astype(np.int32))]
    out = mx.where(mx.array(flat_mask)[:, None], gathered, embeddings.reshape(B * T, H))
    return out.reshape(B, T, H)
