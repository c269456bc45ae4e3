"""Checkpoint loading: a local folder or a Hub repo id -> a validated `Model` with lazily read weights.

Every check (config, shard list, safetensors headers, tensor names, shapes) runs before any weight is read, so bad
input fails fast with the file and tensor it concerns, and no half-built model is ever returned.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ConfigError, ModelConfig, with_max_context
from .convert.hf import hf_to_mlx, keeps_fp32
from .convert.mlx_layout import from_disk, is_mlx_layout, module_from_disk_quantized
from .model import Model

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.tiktoken", "*.model", "*.py", "*.md"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                      "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where there is one, the tensor."""


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local checkpoint folder, or a Hub repo id downloaded (or found in the local Hub cache)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint folder (config.json + *.safetensors)")
        return path
    name = str(path_or_repo)
    if not REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name}: no such folder, and not a Hugging Face repo id (owner/name)")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # snapshot_download shows a progress bar, and falls back to the local cache when the Hub is unreachable.
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model repo on the Hugging Face Hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: the Hugging Face Hub cannot be reached and the model is not in the local cache; "
            "connect once to download it, or pass a local folder"
        ) from None
    except OSError as e:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"{repo_id}: download failed ({e}) and the model is not in the local cache"
            ) from None


def check_safetensors(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and validate a safetensors header against the file size; returns {tensor: header entry}."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size, end_max = size - 8 - n, 0
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            count = 1
            for d in entry["shape"]:
                count *= d
            expected = count * SAFETENSORS_DTYPES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry {entry}") from None
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor '{name}' has {end - begin} bytes for shape {entry['shape']}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of a {data_size}-byte data section"
            )
        end_max = max(end_max, end)
    return header


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked against its index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: missing shard(s) {missing} listed in {index.name}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights; this folder is not a model checkpoint")
    return files


def read_checkpoint(folder: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Lazily read every tensor (nothing is loaded until evaluated); returns (hf tensors, hf name -> file)."""
    tensors: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for f in checkpoint_files(folder):
        header = check_safetensors(f)
        for name in header:
            if name in origin:
                raise CheckpointError(f"{f}: tensor '{name}' also appears in {origin[name]}")
            origin[name] = str(f)
        try:
            tensors.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file: {e}") from None
    return tensors, origin


def mtp_layer_count(names: list[str], config: ModelConfig) -> int:
    found = {int(m.group(1)) for n in names if (m := MTP_LAYER.match(n))}
    if not any(n.startswith("mtp.") for n in names):
        return 0
    return max(config.text.mtp_num_hidden_layers, max(found, default=-1) + 1)


def check_against_model(model: Model, weights: dict[str, mx.array], sources: dict[str, list[str]],
                         origin: dict[str, str]) -> None:
    expected = dict(tree_flatten(model.parameters()))

    def where(name: str) -> str:
        hf = sources[name]
        files = sorted({origin[h] for h in hf})
        return f"{files[0] if len(files) == 1 else files} (tensor '{hf[0]}'{' ...' if len(hf) > 1 else ''})"

    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected tensor in {where(unexpected[0])}: no parameter '{unexpected[0]}' in a "
                              f"{model.config.model_type} model with this config" +
                              (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, w in weights.items():
        shape = tuple(w.shape) if isinstance(w, mx.array) else (len(w), *w[0].shape)  # a list: slices of axis 0
        if shape != tuple(expected[name].shape):
            raise CheckpointError(f"shape mismatch in {where(name)}: {shape} in the checkpoint, "
                                  f"{tuple(expected[name].shape)} expected from config.json for '{name}'")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{len(missing)} parameter(s) missing from the checkpoint, e.g. '{missing[0]}'")


def _cast(name: str, w: mx.array, dtype: mx.Dtype | None) -> mx.array:
    if keeps_fp32(name):
        return w.astype(mx.float32)
    if dtype is None or not mx.issubdtype(w.dtype, mx.floating):
        return w
    return w.astype(dtype)


def canonical_tensors(tensors: dict[str, mx.array], config: ModelConfig):
    """Yield (canonical name, array, source names) from either the raw HF layout or the MLX on-disk layout.

    In the MLX layout everything is already transformed, except `mtp.*` written by someone other than this
    package's converter (mlx-lm and mlx-vlm drop the MTP head; a raw MTP shard added beside them is still HF).
    """
    if not is_mlx_layout(tensors):
        yield from hf_to_mlx(tensors.items())
        return
    ours = "mlx_qwen36" in config.raw
    raw_mtp = {k: v for k, v in tensors.items() if k.startswith("mtp.") and not ours}
    yield from from_disk((k, v) for k, v in tensors.items() if k not in raw_mtp)
    yield from hf_to_mlx(raw_mtp.items())


def quantization_of(config: ModelConfig) -> tuple[dict, dict[str, dict]] | None:
    """(default spec, {canonical module: spec or False}) from an mlx-lm style `quantization` config section."""
    q = config.raw.get("quantization") or config.raw.get("quantization_config")
    if not q or "bits" not in q:
        return None
    default = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    overrides = {module_from_disk_quantized(k): v for k, v in q.items() if isinstance(v, (dict, bool))}
    return default, overrides


def _quantize(model: Model, weights: dict[str, mx.array], quant: tuple[dict, dict[str, dict]]) -> None:
    default, overrides = quant

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        spec = overrides.get(path, default)
        return dict(default, **spec) if isinstance(spec, dict) else spec

    nn.quantize(model, class_predicate=predicate)


def load_model(path_or_repo: str | Path, text_only: bool = False, dtype: mx.Dtype | str | None = None,
               lazy: bool = False, mtp: bool = False, max_context: int | None = None) -> Model:
    """Build the model of a checkpoint and load its weights, keeping the checkpoint's dtype unless `dtype` is given.

    `mtp=True` also builds the multi-token-prediction head (`model.mtp`, ~0.85 B parameters in the 35B-A3B) from the
    checkpoint's `mtp.*` weights, for speculative decoding (`stream_generate(..., draft_tokens=k)`); without it
    those weights are not read. A checkpoint without them then raises CheckpointError.
    `max_context` past the checkpoint's native context switches rotary to YaRN (`config.with_max_context`).

    Weights stay memory-mapped-lazy until evaluated: the peak while loading is about one copy of the weights.
    """
    folder = resolve_model_path(path_or_repo)
    config = ModelConfig.from_file(folder / "config.json")
    if max_context is not None:
        config = with_max_context(config, max_context)
    if isinstance(dtype, str):
        try:
            dtype = getattr(mx, dtype)
        except AttributeError:
            raise ValueError(f"dtype '{dtype}' is not an MLX dtype (use bfloat16, float16 or float32)") from None
    tensors, origin = read_checkpoint(folder)

    weights: dict[str, mx.array] = {}
    sources: dict[str, list[str]] = {}
    try:
        for name, w, src in canonical_tensors(tensors, config):
            weights[name] = _cast(name, w, dtype)
            sources[name] = src
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    del tensors

    # The vision tower is built when asked for and the checkpoint has one (mlx-lm conversions drop it); its
    # weights are then validated like the text ones. text_only=True builds no tower and skips its weights.
    vision = not text_only and config.vision is not None and any(k.startswith("visual.") for k in weights)
    mtp_layers = mtp_layer_count(list(weights), config) if mtp else 0
    if mtp and not mtp_layers:
        raise CheckpointError(f"{folder}: mtp=True, but the checkpoint has no MTP head (no mtp.* tensors; mlx-lm and "
                              "mlx-vlm conversions drop it: convert the HF checkpoint with python -m "
                              "mlx_qwen36.convert)")
    model = Model(config, mtp_layers=mtp_layers, vision=vision)
    dropped = tuple(prefix for prefix, kept in (("visual.", vision), ("mtp.", mtp)) if not kept)
    weights = {k: v for k, v in weights.items() if not k.startswith(dropped)}
    if (quant := quantization_of(config)) is not None:
        _quantize(model, weights, quant)
    check_against_model(model, weights, sources, origin)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if not lazy:
        try:
            mx.eval(model.parameters())
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{folder}: reading the weights failed: {e}") from None
        if mx.default_device() == mx.cpu:
            from .ops import relayout_for_cpu

            relayout_for_cpu(model)  # the CPU BLAS multiplies [in, out] weights about twice as fast
    model.eval()
    return model


def load(path_or_repo: str | Path, text_only: bool = False, dtype: mx.Dtype | str | None = None,
         lazy: bool = False, mtp: bool = False, max_context: int | None = None) -> tuple[Model, Any]:
    """`model, processor = load(path_or_repo)`: the model and its tokenizer/chat-template processor (`mtp=True`:
    with the MTP head, for speculative decoding)."""
    from .processor import load_processor

    folder = resolve_model_path(path_or_repo)
    model = load_model(folder, text_only=text_only, dtype=dtype, lazy=lazy, mtp=mtp, max_context=max_context)
    return model, load_processor(folder)


__all__ = ["CheckpointError", "ConfigError", "load", "load_model", "resolve_model_path"]
