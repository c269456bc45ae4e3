"""Images and videos in a prompt: preprocessing, placeholder expansion, 3-D positions, and cached features.

The generator asks this module for a `MediaPrompt`: the expanded token ids, the vision features each media item
needs (computed once per conversation: a feature cache keyed by the content hash of its pixels), the [3, 1, T]
position ids and `rope_delta`, and the cache keys of the prompt: token ids in which every pad token of an item is
replaced by a negative id derived from the item's hash, so a prompt cache never reuses one image's state for
another image.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .positions import get_rope_index
from .processor import normalize_messages

FEATURE_CACHE_ITEMS = 32


@dataclass
class MediaItem:
    kind: str  # "image" or "video"
    pixels: np.ndarray  # [N, C·T·p·p]
    grid: np.ndarray  # [t, h, w]
    digest: str

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.grid)) // 4


@dataclass
class MediaPrompt:
    ids: list[int]
    keys: list[int]
    items: list[MediaItem]
    position_ids: mx.array  # [3, 1, T]
    rope_delta: int
    pad_rows: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> prompt positions of its pad tokens


class FeatureCache:
    """Vision features by content hash, least recently used first out."""

    def __init__(self, capacity: int = FEATURE_CACHE_ITEMS):
        self.capacity = capacity
        self.items: OrderedDict[str, mx.array] = OrderedDict()

    def get(self, model: Any, item: MediaItem) -> mx.array:
        if item.digest in self.items:
            self.items.move_to_end(item.digest)
            return self.items[item.digest]
        features = model.visual(mx.array(item.pixels), mx.array(item.grid[None]))
        mx.eval(features)
        self.items[item.digest] = features
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return features


def collect_media(messages: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The images and videos of OpenAI-style messages, in prompt order."""
    images, videos = [], []
    for message in normalize_messages(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and (part.get("type") == "image" or "image" in part):
                images.append(part.get("image"))
            elif isinstance(part, dict) and (part.get("type") == "video" or "video" in part):
                videos.append(part.get("video"))
    return images, videos


def with_media(prompt: str, images: Sequence[Any] | None, videos: Sequence[Any] | None) -> list[dict]:
    """A user message holding the media parts, then the text."""
    parts: list[dict] = [{"type": "image", "image": im} for im in images or []]
    parts += [{"type": "video", "video": v} for v in videos or []]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def _digest(kind: str, pixels: np.ndarray, grid: np.ndarray) -> str:
    h = hashlib.sha256(kind.encode())
    h.update(np.ascontiguousarray(grid, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def _split(kind: str, pixels: np.ndarray, grids: np.ndarray) -> list[MediaItem]:
    items, row = [], 0
    for grid in np.asarray(grids).reshape(-1, 3):
        n = int(np.prod(grid))
        chunk = pixels[row: row + n]
        items.append(MediaItem(kind, chunk, np.asarray(grid), _digest(kind, chunk, grid)))
        row += n
    return items


def _key(digest: str) -> int:
    return -1 - int(digest[:12], 16)


def media_prompt(model: Any, processor: Any, text: str, images: Sequence[Any], videos: Sequence[Any]) -> MediaPrompt:
    """Preprocess the media of a rendered prompt, expand its placeholders and compute its 3-D positions."""
    if not getattr(model, "has_vision", False):
        raise ValueError("this model was loaded without its vision tower (text_only=True, or a text-only "
                         "checkpoint); images and videos cannot be used")
    image_grid = video_grid = timestamps = None
    items: list[MediaItem] = []
    if images:
        out = processor.image_processor(list(images))
        image_grid = out["image_grid_thw"]
        items += _split("image", out["pixel_values"], image_grid)
    if videos:
        out = processor.video_processor(list(videos))
        video_grid, timestamps = out["video_grid_thw"], out["video_timestamps"]
        items += _split("video", out["pixel_values_videos"], video_grid)
    ids = processor.encode(processor.expand_vision_tokens(text, image_grid, video_grid, timestamps))
    cfg = model.config
    arr = np.asarray(ids)
    pad_rows = {"image": np.nonzero(arr == cfg.image_token_id)[0], "video": np.nonzero(arr == cfg.video_token_id)[0]}
    keys = list(ids)
    for kind in ("image", "video"):
        rows = iter(pad_rows[kind])
        for item in (i for i in items if i.kind == kind):
            for _ in range(item.num_tokens):
                keys[next(rows)] = _key(item.digest)
    position_ids, deltas = get_rope_index(mx.array([ids]), image_grid, video_grid, cfg)
    return MediaPrompt(ids, keys, items, position_ids, int(deltas[0].item()), pad_rows)


def embed(model: Any, mp: MediaPrompt, start: int, features: FeatureCache) -> mx.array:
    """Input embeddings [1, T - start, H] of the prompt from `start` on, vision features in their pad rows."""
    h = model.model.embed_tokens(mx.array([mp.ids[start:]]))
    for kind in ("image", "video"):
        rows = mp.pad_rows[kind]
        kind_items = [i for i in mp.items if i.kind == kind]
        offset = 0
        for item in kind_items:
            item_rows = rows[offset: offset + item.num_tokens]
            offset += item.num_tokens
            needed = item_rows >= start
            if not needed.any():
                continue  # wholly inside the reused prefix
            feats = features.get(model, item)[mx.array(np.nonzero(needed)[0])]
            h[0, mx.array(item_rows[needed] - start)] = feats.astype(h.dtype)
    return h
