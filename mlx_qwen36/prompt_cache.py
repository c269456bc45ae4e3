"""A multi-turn prompt cache for the hybrid model: reuse the longest exactly matching prefix across turns.

Attention KV could be trimmed to any prefix, but GDN states cannot be rewound token by token, so the cache keeps
snapshots of the whole model state at message boundaries (each `<|im_start|>`) and at the end of every turn. A new
prompt restores the latest snapshot inside its common prefix with the cached tokens and prefills only the rest.
Snapshots past the restored point are dropped, since the KV rows they cover get overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache import GDNCache
from .cache import restore as restore_cache
from .cache import snapshot as snapshot_cache
from .model import Model
from .multimodal import FeatureCache

IM_START = 248045
MAX_SNAPSHOTS = 16
FORMAT = "mlx_qwen36.prompt_cache.1"


class PromptCacheError(ValueError):
    """A prompt cache that does not belong to this model, or a damaged cache file."""


def model_fingerprint(model: Model) -> str:
    """Identifies the architecture and config a cache was computed with."""
    text = json.dumps(model.config.raw.get("text_config", model.config.raw), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PromptCache:
    """The model cache plus the tokens it holds and restorable snapshots keyed by token position."""

    def __init__(self, model: Model):
        self.fingerprint = model_fingerprint(model)
        self.cache = model.make_cache()
        self.tokens: list[int] = []
        self.snapshots: dict[int, list[Any]] = {0: snapshot_cache(self.cache)}
        self.features = FeatureCache()  # vision features of this conversation's images, by content hash

    def _check(self, model: Model) -> None:
        if model_fingerprint(model) != self.fingerprint:
            raise PromptCacheError("this prompt cache was made by a model with another config; make a new one")

    def reuse(self, model: Model, prompt: list[int]) -> int:
        """Rewind to the best snapshot for `prompt`; returns how many prompt tokens are already in the cache.

        At least the last prompt token is always left to compute, because its logits start the generation.
        """
        self._check(model)
        common = 0
        limit = min(len(self.tokens), len(prompt) - 1)
        while common < limit and self.tokens[common] == prompt[common]:
            common += 1
        position = max(p for p in self.snapshots if p <= common)
        restore_cache(self.cache, self.snapshots[position])
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= position}
        self.tokens = self.tokens[:position]
        return position

    def record(self, tokens: list[int]) -> None:
        """Note tokens just pushed through the model cache."""
        self.tokens.extend(tokens)

    def mark(self) -> None:
        """Snapshot the current state (a message boundary or the end of a turn)."""
        position = len(self.tokens)
        self.snapshots[position] = snapshot_cache(self.cache)
        while len(self.snapshots) > MAX_SNAPSHOTS:
            del self.snapshots[min(p for p in self.snapshots if p > 0)]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def save(self, path: str | Path) -> None:
        """Save the state, the tokens and every snapshot (so a loaded cache reuses as much as this one would)."""
        arrays: dict[str, mx.array] = {}
        for i, c in enumerate(self.cache):
            for j, a in enumerate(c.state):
                arrays[f"layer.{i}.{j}"] = a
        for pos, snap in self.snapshots.items():
            for i, layer_snap in enumerate(snap):
                if isinstance(layer_snap, tuple) and layer_snap[0] is not None:
                    arrays[f"snapshot.{pos}.{i}.0"], arrays[f"snapshot.{pos}.{i}.1"] = layer_snap[:2]
        meta = {"fingerprint": self.fingerprint, "tokens": json.dumps(self.tokens),
                "snapshots": json.dumps(sorted(self.snapshots)),
                "kinds": json.dumps([type(c).__name__ for c in self.cache]), "format": FORMAT}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial.safetensors")  # MLX appends .safetensors to other names
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, model: Model, path: str | Path) -> PromptCache:
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise PromptCacheError(f"{path}: not a readable prompt cache ({e})") from None
        if meta.get("format") != FORMAT:
            raise PromptCacheError(f"{path}: not an mlx_qwen36 prompt cache")
        pc = cls(model)
        if meta["fingerprint"] != pc.fingerprint:
            raise PromptCacheError(f"{path}: saved by a model with another config; it cannot be used with this one")
        if json.loads(meta["kinds"]) != [type(c).__name__ for c in pc.cache]:
            raise PromptCacheError(f"{path}: layer layout does not match this model")
        pc.tokens = json.loads(meta["tokens"])
        for i, c in enumerate(pc.cache):
            c.state = [arrays[f"layer.{i}.{j}"] for j in range(2) if f"layer.{i}.{j}" in arrays]
            c.offset = len(pc.tokens)
        for pos in json.loads(meta["snapshots"]):
            pc.snapshots[pos] = [
                (arrays.get(f"snapshot.{pos}.{i}.0"), arrays.get(f"snapshot.{pos}.{i}.1"), pos)
                if isinstance(c, GDNCache) else pos
                for i, c in enumerate(pc.cache)
            ]
        return pc


def make_prompt_cache(model: Model) -> PromptCache:
    """A reusable multi-turn cache: pass it as `prompt_cache=` to `stream_generate` / `generate`."""
    return PromptCache(model)


__all__ = ["PromptCache", "PromptCacheError", "make_prompt_cache", "model_fingerprint"]
