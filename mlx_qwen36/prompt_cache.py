"""A multi-turn prompt cache for the hybrid model: reuse the longest exactly matching prefix across turns.

Attention KV could be trimmed to any prefix, but GDN states cannot be rewound token by token, so the cache keeps
snapshots of the whole model state at message boundaries (each `<|im_start|>`) and at the end of every turn. A new
prompt restores the latest snapshot inside its common prefix with the cached tokens and prefills only the rest.
Snapshots past the restored point are dropped, since the KV rows they cover get overwritten.

A KV snapshot is an offset into the shared KV buffers, but a GDN snapshot holds every GDN layer's conv and fp32
recurrent state (~60 MB on Qwen3.6-35B-A3B), so snapshots are bounded in number and in bytes, the oldest going
first: a new turn restores one of the latest boundaries, older ones only serve a conversation edited far back.

A cache belongs to one model: its `model_fingerprint` covers everything the state depends on, so a cache made
with the 4-bit model is refused by the 8-bit one of the same config.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .cache import GDNCache
from .cache import restore as restore_cache
from .cache import snapshot as snapshot_cache
from .model import Model
from .multimodal import FeatureCache, MediaCache

IM_START = 248045
MAX_SNAPSHOTS = 16
MAX_SNAPSHOT_BYTES = 512 << 20  # about 8 GDN snapshots of Qwen3.6-35B-A3B, 3 of Qwen3.6-27B
SMALL_TENSOR_BYTES = 16 << 10  # parameters hashed whole by the fingerprint: norms, A_log, dt_bias
FORMAT = "mlx_qwen36.prompt_cache.3"


class PromptCacheError(ValueError):
    """A prompt cache that does not belong to this model, or a damaged cache file."""


def model_fingerprint(model: Model) -> str:
    """Identifies what a cached state depends on: the config; every parameter's name, shape and dtype (so the
    dtypes, and which modules are quantized: packed weights, scales and biases change shape); each quantized
    module's bits, group size and mode; and the values of the small parameters (norms, `A_log`, `dt_bias`), which
    differ between checkpoints of one architecture. Cheap on any model: no large tensor is read, so lazily loaded
    weights stay unloaded (sampling rows of the embedding would load all of it)."""
    raw = model.config.raw
    config = {"text": raw.get("text_config", raw), "vision": raw.get("vision_config")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    if isinstance(model, nn.Module):  # duck-typed models (test doubles) are identified by their config alone
        params = tree_flatten(model.parameters())
        for name, a in params:
            h.update(f"{name}:{a.shape}:{a.dtype}\n".encode())
        for name, module in model.named_modules():
            if hasattr(module, "bits"):
                h.update(f"{name}:{module.bits}:{module.group_size}:{getattr(module, 'mode', 'affine')}\n".encode())
        small = [a.reshape(-1).view(mx.uint8) for _, a in params if a.nbytes <= SMALL_TENSOR_BYTES]
        if small:
            h.update(np.array(mx.concatenate(small)))  # one evaluation for all of them
    return h.hexdigest()[:16]


def _snapshot_arrays(snap: list[Any]) -> list[mx.array]:
    """The arrays a snapshot holds (a GDN layer's conv and recurrent states; a KV layer's is an offset)."""
    return [a for layer in snap if isinstance(layer, tuple) for a in layer if isinstance(a, mx.array)]


class PromptCache:
    """The model cache plus the tokens it holds and restorable snapshots keyed by token position.

    It also keeps this conversation's media: preprocessed items (`media`) and vision features (`features`).
    After `load`, `conversation` is what `save` was given (None otherwise).
    """

    def __init__(self, model: Model, max_snapshot_bytes: int = MAX_SNAPSHOT_BYTES, kv_bits: int | None = None,
                 kv_group_size: int = 64):
        self.fingerprint = model_fingerprint(model)
        self._checked = weakref.ref(model)  # the model object last found to match, not fingerprinted every turn
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size  # the attention layers' KV storage
        self.cache = model.make_cache(kv_bits, kv_group_size) if kv_bits is not None else model.make_cache()
        self.tokens: list[int] = []
        self.snapshots: dict[int, list[Any]] = {0: snapshot_cache(self.cache)}
        self.max_snapshot_bytes = max_snapshot_bytes
        self.media = MediaCache()  # preprocessed images and videos, by source identity
        self.features = FeatureCache()  # vision features of this conversation's images, by content hash
        self.conversation: Any = None

    def _check(self, model: Model) -> None:
        if self._checked() is model:
            return
        if model_fingerprint(model) != self.fingerprint:
            raise PromptCacheError("this prompt cache was made by another model (its config, quantization, dtypes "
                                   "or weights differ); make a new one")
        self._checked = weakref.ref(model)

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
        """Snapshot the current state (a message boundary or the end of a turn), then keep within the budgets:
        drop the oldest snapshots, never the empty one at 0 nor the one just taken."""
        position = len(self.tokens)
        self.snapshots[position] = snapshot_cache(self.cache)
        while len(self.snapshots) > 2 and (len(self.snapshots) > MAX_SNAPSHOTS
                                           or self.snapshot_nbytes > self.max_snapshot_bytes):
            del self.snapshots[min(p for p in self.snapshots if p > 0)]

    @property
    def snapshot_nbytes(self) -> int:
        """Bytes the snapshots hold beyond the current state, each array counted once: the latest snapshot usually
        shares the state's arrays, and snapshots restored from one another share theirs."""
        live = {id(a) for c in self.cache if isinstance(c, GDNCache) for a in c.state}
        held = {id(a): a.nbytes for s in self.snapshots.values() for a in _snapshot_arrays(s) if id(a) not in live}
        return sum(held.values())

    @property
    def nbytes(self) -> int:
        """The state and its snapshots."""
        return sum(c.nbytes for c in self.cache) + self.snapshot_nbytes

    def save(self, path: str | Path, conversation: Any = None) -> None:
        """Save the state, the tokens, every snapshot (so a loaded cache reuses as much as this one would) and
        `conversation`, any JSON value (the chat keeps its messages there), which `load` gives back.

        Any file name works; the file is safetensors. Each array is written once, however many snapshots share it.
        """
        try:
            conversation_json = json.dumps(conversation)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the conversation cannot be saved with the prompt cache: {e}") from None
        arrays: dict[str, mx.array] = {}
        names: dict[int, str] = {}

        def ref(a: mx.array) -> str:
            if id(a) not in names:
                names[id(a)] = f"array.{len(names)}"
                arrays[names[id(a)]] = a
            return names[id(a)]

        layout = {
            "state": [[ref(a) for a in c.state] for c in self.cache],
            "snapshots": {str(pos): [[ref(a) for a in layer[:2]] if isinstance(layer, tuple) and layer[0] is not None
                                     else None for layer in snap] for pos, snap in sorted(self.snapshots.items())},
        }
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "tokens": json.dumps(self.tokens),
                "kv": json.dumps({"bits": self.kv_bits, "group_size": self.kv_group_size}),
                "kinds": json.dumps([type(c).__name__ for c in self.cache]), "layout": json.dumps(layout),
                "conversation": conversation_json}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial.safetensors")  # MLX appends .safetensors to other names
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, model: Model, path: str | Path, max_snapshot_bytes: int = MAX_SNAPSHOT_BYTES) -> PromptCache:
        """A cache saved by `save`, for `model`; PromptCacheError names the file when it cannot be used."""
        try:  # the format is given: MLX would guess it from the suffix, and `save` takes any name
            arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise PromptCacheError(f"{path}: not a readable prompt cache ({e})") from None
        if meta.get("format") != FORMAT:
            if str(meta.get("format", "")).startswith("mlx_qwen36.prompt_cache."):
                raise PromptCacheError(f"{path}: saved by another version of mlx_qwen36 ({meta['format']}; this one "
                                       f"reads {FORMAT}); make a new cache")
            raise PromptCacheError(f"{path}: not an mlx_qwen36 prompt cache")
        try:
            kv = json.loads(meta.get("kv", "{}"))
            pc = cls(model, max_snapshot_bytes, kv.get("bits"), kv.get("group_size", 64))
        except (ValueError, TypeError, AttributeError) as e:
            raise PromptCacheError(f"{path}: damaged prompt cache ({e})") from None
        if meta.get("fingerprint") != pc.fingerprint:
            raise PromptCacheError(f"{path}: saved by another model (its config, quantization, dtypes or weights "
                                   "differ); it cannot be used with this one")
        try:
            pc._restore(arrays, meta)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise PromptCacheError(f"{path}: damaged prompt cache ({type(e).__name__}: {e})") from None
        return pc

    def _restore(self, arrays: dict[str, mx.array], meta: dict[str, str]) -> None:
        if json.loads(meta["kinds"]) != [type(c).__name__ for c in self.cache]:
            raise ValueError("its layer layout does not match this model")
        layout = json.loads(meta["layout"])
        self.tokens = json.loads(meta["tokens"])
        for c, names in zip(self.cache, layout["state"], strict=True):
            c.state = [arrays[n] for n in names]
            c.offset = len(self.tokens)
        for pos, snap in layout["snapshots"].items():
            self.snapshots[int(pos)] = [_layer_snapshot(c, names, arrays, int(pos))
                                        for c, names in zip(self.cache, snap, strict=True)]
        self.conversation = json.loads(meta["conversation"])


def _layer_snapshot(c: Any, names: list[str] | None, arrays: dict[str, mx.array], pos: int) -> Any:
    """One layer's snapshot at `pos` as `cache.snapshot` makes it: an offset for KV, the two states for GDN."""
    if not isinstance(c, GDNCache):
        return pos
    conv, recurrent = (arrays[n] for n in names) if names else (None, None)
    return conv, recurrent, pos


def make_prompt_cache(model: Model, max_snapshot_bytes: int = MAX_SNAPSHOT_BYTES, kv_bits: int | None = None,
                      kv_group_size: int = 64) -> PromptCache:
    """A reusable multi-turn cache: pass it as `prompt_cache=` to `stream_generate` / `generate`.

    `max_snapshot_bytes` bounds what its snapshots hold beyond the current state (see `PromptCache.mark`);
    `kv_bits` (4 or 8) keeps the attention layers' keys and values quantized (`cache.QuantizedKVCache`).
    """
    return PromptCache(model, max_snapshot_bytes, kv_bits, kv_group_size)


__all__ = ["PromptCache", "PromptCacheError", "make_prompt_cache", "model_fingerprint"]
