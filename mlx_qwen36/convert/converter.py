"""Hugging Face Qwen3.6 checkpoint -> quantized (or plain) MLX checkpoint, streaming, all-or-nothing.

Every input problem is found before any work (config, shard list, safetensors headers, names and shapes against the
model), tensors are then computed and written one at a time, and the result appears at `--mlx-path` only when it is
complete: it is built in a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..config import ModelConfig
from ..loader import CheckpointError, check_against_model, mtp_layer_count, read_checkpoint, resolve_model_path
from ..model import Model
from .hf import hf_to_mlx, keeps_fp32
from .mlx_layout import is_mlx_layout, to_disk
from .quantize import QuantSpec, check_arguments, quant_spec
from .writer import Tensor, nbytes_of, shape_of, write_safetensors

FORMAT_VERSION = 1
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


class ConversionError(RuntimeError):
    """The conversion stopped; the message says why and that nothing was left at the target."""


@dataclass
class ConvertOptions:
    quantize: bool = False
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    recipe: str = "uniform"
    dtype: str = "bfloat16"
    drop_mtp: bool = False
    drop_vision: bool = False
    quantize_vision: bool = False
    shard_bytes: int = 5 * 10**9


@dataclass
class ConvertSummary:
    path: Path
    bytes: int = 0
    parameters: int = 0
    bits_per_weight: float = 0.0
    seconds: float = 0.0
    quantized: dict[str, dict] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"wrote {self.path}: {self.bytes / 1e9:.2f} GB, {self.parameters / 1e9:.3f}B parameters, "
                f"{self.bits_per_weight:.2f} bits per weight on average, {self.seconds:.1f} s")


def _check_paths(src: Path, out: Path, force: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise ConversionError(f"--mlx-path {out} is inside the input checkpoint {src}; choose another folder")
    if out_r in src_r.parents:
        raise ConversionError(f"--mlx-path {out} contains the input checkpoint {src}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--mlx-path {out} is a file")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConversionError(f"--mlx-path {out} exists and is not empty; pass --force to replace it")


def plan(tensors: dict[str, mx.array], config: ModelConfig, opts: ConvertOptions,
         origin: dict[str, str]) -> tuple[list[tuple[str, Tensor]], ConvertSummary, dict]:
    """The output tensors (lazy, in write order), the parameter/bit accounting, and the quantization config."""
    dtype = DTYPES[opts.dtype]
    canonical: dict[str, Tensor] = {}
    sources: dict[str, list[str]] = {}
    # Per-expert groups stay lists of slices: each expert is transformed and written on its own, never stacked.
    for name, w, src in hf_to_mlx(tensors.items(), stacked=False):
        if (opts.drop_mtp and name.startswith("mtp.")) or (opts.drop_vision and name.startswith("visual.")):
            continue
        target = mx.float32 if keeps_fp32(name) else dtype
        canonical[name] = w.astype(target) if isinstance(w, mx.array) else [p.astype(target) for p in w]
        sources[name] = src
    model = Model(config, mtp_layers=mtp_layer_count(list(canonical), config))
    check_against_model(model, {k: v for k, v in canonical.items() if not k.startswith("visual.")}, sources, origin)

    summary = ConvertSummary(path=Path())
    qconfig: dict = {}
    bits = 0
    out: list[tuple[str, Tensor]] = []
    for name, w in canonical.items():
        module, part = name.rsplit(".", 1)
        shape = shape_of(w)
        spec: QuantSpec | None = None
        if opts.quantize and part == "weight":
            spec = quant_spec(module, shape, bits=opts.bits, group_size=opts.group_size,
                              mode=opts.mode, recipe=opts.recipe, quantize_vision=opts.quantize_vision)
        summary.parameters += math.prod(shape)
        parts = {name: w} if spec is None else _quantized_parts(module, w, spec)
        if spec is not None:
            for disk_name, _ in to_disk(name, w):
                qconfig[disk_name.rsplit(".", 1)[0]] = spec.as_dict()
        for part_name, arr in parts.items():
            for disk_name, disk_arr in to_disk(part_name, arr):
                out.append((disk_name, disk_arr))
                bits += nbytes_of(disk_arr) * 8
    summary.bytes = bits // 8
    summary.bits_per_weight = bits / max(summary.parameters, 1)
    return out, summary, qconfig


def _quantized_parts(module: str, w: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """weight/scales/biases of a quantized module; a list of expert slices is quantized slice by slice."""
    def quantize(a: mx.array) -> list[mx.array]:
        return mx.quantize(a, spec.group_size, spec.bits, mode=spec.mode)

    names = [f"{module}.weight", f"{module}.scales", f"{module}.biases"]
    if isinstance(w, mx.array):
        return dict(zip(names, quantize(w)))
    per_slice = [quantize(p) for p in w]
    return {n: [q[i] for q in per_slice] for i, n in enumerate(names[: len(per_slice[0])])}


def _quantization_section(opts: ConvertOptions, qconfig: dict) -> dict:
    default = QuantSpec(opts.bits, opts.group_size, opts.mode).as_dict()
    section = dict(default)
    section.update({k: v for k, v in qconfig.items() if v != default})
    return section


def _write_config(src: Path, dst: Path, opts: ConvertOptions, qconfig: dict) -> None:
    config = json.loads((src / "config.json").read_text())
    if opts.quantize:
        config["quantization"] = config["quantization_config"] = _quantization_section(opts, qconfig)
    config["mlx_qwen36"] = {"format_version": FORMAT_VERSION, "dtype": opts.dtype, "recipe": opts.recipe
                            if opts.quantize else None, "mtp": not opts.drop_mtp, "vision": not opts.drop_vision}
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def _model_card(src: str, opts: ConvertOptions, summary: ConvertSummary) -> str:
    if opts.quantize:
        how = (f"quantized with the `{opts.recipe}` recipe: {opts.bits}-bit {opts.mode}, group size "
               f"{opts.group_size}; router and shared-expert gate at 8 bits; conv1d, norms, `A_log` and `dt_bias` "
               "unquantized (`A_log`, `dt_bias` and the norms in float32)")
    else:
        how = f"converted to {opts.dtype} without quantization (`A_log`, `dt_bias` and the norms in float32)"
    kept = []
    kept.append("the MTP head was dropped" if opts.drop_mtp else "the MTP head (`mtp.*`) is kept")
    kept.append("the vision tower was dropped" if opts.drop_vision else
                ("the vision tower is quantized" if opts.quantize_vision else f"the vision tower is in {opts.dtype}"))
    return (f"# {Path(src).name} (MLX)\n\nConverted from `{src}` by mlx-qwen36: {how}; {'; '.join(kept)}.\n\n"
            f"Size {summary.bytes / 1e9:.2f} GB, {summary.bits_per_weight:.2f} bits per weight on average.\n\n"
            "```python\nfrom mlx_qwen36 import load\nmodel, processor = load(\"path/or/repo\")\n```\n\n"
            "The tensor layout is mlx-lm's and mlx-vlm's, so `mlx_lm.load` reads the text model too.\n")


def _shards(tensors: list[tuple[str, Tensor]], shard_bytes: int) -> list[list[tuple[str, Tensor]]]:
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        n = nbytes_of(t)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                disable=os.environ.get("MLX_QWEN36_NO_PROGRESS") == "1")


def convert(hf_path: str | Path, mlx_path: str | Path, *, force: bool = False, upload_repo: str | None = None,
            **options) -> ConvertSummary:
    """Convert a Hugging Face Qwen3.6 checkpoint (folder or repo id) into an MLX checkpoint at `mlx_path`.

    Options are those of `ConvertOptions` (quantize, bits, group_size, mode, recipe, dtype, drop_mtp, drop_vision,
    quantize_vision, shard_bytes).
    """
    start = time.perf_counter()
    opts = ConvertOptions(**options)
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype {opts.dtype}: choose one of {sorted(DTYPES)}")
    if opts.quantize:
        check_arguments(opts.bits, opts.group_size, opts.mode, opts.recipe)
    out = Path(mlx_path).expanduser()
    src = resolve_model_path(hf_path)
    _check_paths(src, out, force)
    config = ModelConfig.from_file(src / "config.json")
    tensors, origin = read_checkpoint(src)
    if is_mlx_layout(tensors):
        raise CheckpointError(f"{src} is already an MLX checkpoint (language_model.* names); convert the original "
                              "Hugging Face checkpoint instead")
    try:
        planned, summary, qconfig = plan(tensors, config, opts, origin)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    del tensors
    summary.path = out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = _shards(planned, opts.shard_bytes)
        del planned
        weight_map: dict[str, str] = {}
        with _progress(summary.bytes) as bar:
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                weight_map.update({name: fname for name, _ in shard})
                write_safetensors(tmp / fname, shard, on_written=bar.update)
        index = {"metadata": {"total_size": summary.bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        _write_config(src, tmp, opts, qconfig)
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        summary.quantized = qconfig
        (tmp / "README.md").write_text(_model_card(str(hf_path), opts, summary))
        _replace(tmp, out)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"interrupted; nothing was written to {out}") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise ConversionError(f"the disk is full (writing {out}); nothing was written to {out}") from None
        raise ConversionError(f"{e}; nothing was written to {out}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - start
    if upload_repo:
        upload(out, upload_repo)
    return summary


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old target (allowed by --force) is removed only after that."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def upload(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")


__all__ = ["ConversionError", "ConvertOptions", "ConvertSummary", "convert"]
