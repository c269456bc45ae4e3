"""Images and videos in a prompt: preprocessing, placeholder expansion, 3-D positions, and cached features.

The generator asks this module for a `MediaPrompt`: the expanded token ids, the vision features each media item
needs (computed once per conversation: a feature cache keyed by the content hash of its pixels), the [3, 1, T]
position ids and `rope_delta`, and the cache keys of the prompt: token ids in which every pad token of an item is
replaced by a negative id derived from the item's hash, so a prompt cache never reuses one image's state for
another image.

Every turn renders the whole history, so its media would be decoded and resized again each turn (~100 ms a video
frame). A `MediaCache` keeps each item's preprocessing by the identity of its source and the processor's settings:
a file by its resolved path, size and mtime (an edited file is processed again), a `data:` URL or bytes by their
hash, a PIL image or array by a hash of its pixels, frames by those of each frame and their fps. Only the items it
misses are processed, one at a time: each item's pixels depend on that item alone, so this gives the batch's arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlx.core as mx
import numpy as np
from PIL import Image

from .positions import get_rope_index
from .processor import normalize_messages
from .video import Video

FEATURE_CACHE_ITEMS = 32
MEDIA_CACHE_ITEMS = 64
MEDIA_CACHE_BYTES = 1 << 30  # one long clip at the release's pixel budget is ~300 MB of float32 patches


@dataclass
class MediaItem:
    kind: str  # "image" or "video"
    pixels: np.ndarray  # [N, C·T·p·p]
    grid: np.ndarray  # [t, h, w]
    digest: str
    timestamps: list[float] | None = None  # videos: seconds of each temporal pair

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


class MediaCache:
    """Preprocessed media items by source identity and processor settings (see the module docstring), least
    recently used first out, bounded in items and in bytes of pixels."""

    def __init__(self, capacity: int = MEDIA_CACHE_ITEMS, max_bytes: int = MEDIA_CACHE_BYTES):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.items: OrderedDict[str, MediaItem] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(item.pixels.nbytes for item in self.items.values())

    def get(self, key: str) -> MediaItem | None:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key: str, item: MediaItem) -> None:
        if item.pixels.nbytes > self.max_bytes:
            return  # it would evict everything else and still not fit
        self.items[key] = item
        while len(self.items) > self.capacity or self.nbytes > self.max_bytes:
            self.items.popitem(last=False)


def _local_path(source: str | Path) -> Path | None:
    """The file a path-like source names, as the processors read it; None for remote URLs."""
    text = str(source)
    if isinstance(source, str) and text.startswith(("http://", "https://")):
        return None
    if isinstance(source, str) and text.startswith("file://"):
        text = unquote(urlparse(text).path)
    return Path(text).expanduser().resolve()


def _identify(source: Any, h: Any) -> bool:
    """Feed what identifies `source` to the hash `h`; False when that cannot be told without processing it."""
    if isinstance(source, str) and source.startswith("data:"):
        h.update(b"data-url\0" + source.encode())
    elif isinstance(source, (str, Path)):
        path = _local_path(source)
        if path is None or not path.is_file():
            return False  # the processor names the problem
        stat = path.stat()
        h.update(f"file\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    elif isinstance(source, (bytes, bytearray, memoryview)):
        h.update(b"bytes\0" + bytes(source))
    elif isinstance(source, Image.Image):
        try:
            pixels = source.tobytes()  # the palette and transparency entry change the RGB conversion too
        except (OSError, ValueError):
            return False
        h.update(f"pil\0{source.mode}\0{source.size}\0{source.info.get('transparency')!r}\0".encode())
        h.update(bytes(source.getpalette() or []) + pixels)
    elif isinstance(source, np.ndarray):
        h.update(f"array\0{source.dtype}\0{source.shape}\0".encode())
        h.update(np.ascontiguousarray(source))
    elif isinstance(source, (Video, Mapping)):
        frames = source.frames if isinstance(source, Video) else source.get("frames")
        fps = source.fps if isinstance(source, Video) else source.get("fps")
        h.update(f"frames\0{fps!r}\0".encode())
        return _identify(frames, h)
    elif isinstance(source, (list, tuple)):
        h.update(f"list\0{len(source)}\0".encode())
        return all(_identify(item, h) for item in source)
    else:
        return False
    return True


def media_key(kind: str, source: Any, processor: Any) -> str | None:
    """The cache key of one image or video source under `processor`'s settings; None when it is not cacheable
    (an unknown input type, a missing file, or a processor whose settings are not a dataclass's fields)."""
    if not dataclasses.is_dataclass(processor):
        return None
    h = hashlib.sha256(f"{kind}\0{processor!r}\0".encode())  # the dataclass repr lists every setting
    return h.hexdigest() if _identify(source, h) else None


def _process(kind: str, processor: Any, source: Any) -> MediaItem:
    out = processor([source])
    if kind == "image":
        pixels, grid, timestamps = out["pixel_values"], out["image_grid_thw"][0], None
    else:
        pixels, grid, timestamps = out["pixel_values_videos"], out["video_grid_thw"][0], out["video_timestamps"][0]
    return MediaItem(kind, pixels, np.asarray(grid), _digest(kind, pixels, grid), timestamps)


def preprocess(kind: str, processor: Any, sources: Sequence[Any], cache: MediaCache | None = None) -> list[MediaItem]:
    """Each source's `MediaItem`, in order: from `cache` when it holds the source, else processed (and kept)."""
    items = []
    for source in sources:
        key = media_key(kind, source, processor) if cache is not None else None
        item = cache.get(key) if key is not None else None
        if item is None:
            item = _process(kind, processor, source)
            if key is not None:
                cache.put(key, item)
        items.append(item)
    return items


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


def _key(digest: str) -> int:
    return -1 - int(digest[:12], 16)


def media_prompt(model: Any, processor: Any, text: str, images: Sequence[Any], videos: Sequence[Any],
                 cache: MediaCache | None = None) -> MediaPrompt:
    """Preprocess the media of a rendered prompt (through `cache`, when given), expand its placeholders and compute
    its 3-D positions."""
    if not getattr(model, "has_vision", False):
        raise ValueError("this model was loaded without its vision tower (text_only=True, or a text-only "
                         "checkpoint); images and videos cannot be used")
    image_items = preprocess("image", processor.image_processor, images, cache) if images else []
    video_items = preprocess("video", processor.video_processor, videos, cache) if videos else []
    items = image_items + video_items
    image_grid = np.stack([i.grid for i in image_items]) if image_items else None
    video_grid = np.stack([i.grid for i in video_items]) if video_items else None
    timestamps = [i.timestamps for i in video_items] if video_items else None
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
