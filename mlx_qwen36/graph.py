"""The graph one call of a function builds, primitive by primitive, with every input's and output's shape and dtype:
what the benchmark counts per decoded token (dispatches, bytes moved).

    nodes = trace(lambda tok: step(tok, cache), token)      # one Node per primitive, in tape order
    dispatches(nodes), bytes_moved(nodes), by_primitive(nodes)

MLX's Python API shows a graph only through `mx.export_to_dot` (no shapes) and `mx.export_function`. `trace` uses
the latter with a *callback* instead of a file: MLX hands the callback the function's inputs, its constants (as
arrays, so closed-over weights are never copied) and then one record per primitive of the tape, with the primitive's
name and the shape and dtype of each input and output. The tape is the one an `.mlxfn` file holds: traced once,
simplified by `compile_simplify` (common subexpressions merged), a multi-output primitive once with all its outputs.
`trace_file` / `read_mlxfn` read the same tape from an `.mlxfn` file, for files exported elsewhere (a Mac) and as a
cross-check of `trace`; that format writes each primitive's state with no length prefix, so the reader carries the
state layout of every primitive MLX serializes (`STATE_LAYOUTS`, from the 0.32.4 headers) and reads only files whose
header names a version it was checked against (`MLXFN_VERSIONS`).

What the exported graph is, and is not:
- a custom Metal kernel (`mx.fast.metal_kernel`) is recorded as one `CustomKernel` node named by its kernel
  name, even on Linux (calling one outside an export raises "No Metal back-end");
- `mx.compile`d code called inside the traced function is inlined: its primitives appear one by one, never as a
  `Compiled` node (MLX's compile runs the plain function when its inputs are tracers). On a GPU, compile fuses
  elementwise chains into one kernel, so the count here is the unfused count;
- `mx.fast.rms_norm` / `layer_norm` / `rope` / `scaled_dot_product_attention` record their fallback ops on a machine
  without a GPU back end (Linux: always), not the one fused primitive a Mac records;
- `mx.contiguous` has no export serializer in MLX 0.32.4 ("Unable to get state for primitive Contiguous"), and
  mlx-lm's GatedDeltaNet calls it on every decode step; while tracing it is swapped for an `mx.depends` on a
  sentinel constant, and that node is reported as `Contiguous` (a dispatch: it copies when its input is not
  contiguous). Other primitives with no serializer (BitwiseInvert, SegmentedMM, LUF, QQMatmul, ToFP8,
  CumLogAddExp in 0.32.4) fail with MLX's own message naming the primitive.

Caveats of the counts: a primitive counts as one dispatch even where its GPU implementation launches several
kernels (Concatenate: one copy per input; SliceUpdate: a copy of the destination unless donated). Bytes are logical
sizes: an input that is a broadcast view counts at its broadcast size, a gather counts its whole table (an
embedding's Gather the full matrix, a MoE GatherQMM every expert) and an in-place update (SliceUpdate on a KV
buffer) the whole buffer in and out; `bytes_moved(nodes, touched_only=True)` counts what those touch instead.

The traced function runs once on tracer arrays: its side effects stay (a cache it updates holds tracers afterwards:
trace on a throwaway cache). An array it closes over that is not yet evaluated brings the graph that computes it
into the trace: evaluate closed-over arrays first.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

__all__ = ["MLXFN_VERSIONS", "STATE_LAYOUTS", "VIEWS", "GraphError", "Node", "by_primitive", "bytes_moved",
           "dispatches", "read_mlxfn", "trace", "trace_file"]

Spec = tuple[tuple[int, ...], str]


class GraphError(RuntimeError):
    """A graph MLX could not export, or an export this module cannot read."""


@dataclass(frozen=True)
class Node:
    primitive: str  # MLX's name for it: "Matmul", "CustomKernel", "QuantizedMatmul", "Sum", "Rsqrt", ...
    name: str | None  # a CustomKernel's kernel name (from its state), else None
    inputs: tuple[Spec, ...]  # (shape, dtype name) of each input, in order
    outputs: tuple[Spec, ...]  # (shape, dtype name) of each output (a multi-output primitive's siblings, once)


# Primitives that launch nothing on the GPU back end (mlx/backend/gpu/primitives.cpp, mlx/backend/common/common.cpp
# in MLX 0.32.4): each one's eval only re-describes its input's buffer (shape / strides / offset / dtype) or, for
# NumberOfElements, writes a host scalar from the input's shape.
#   Transpose, Slice, Broadcast, BroadcastAxes, ExpandDims, Squeeze, Split, AsStrided: `copy_shared_buffer` with new
#     strides/offset (slice_gpu is the common `slice`, a shared buffer);
#   StopGradient, Depends, Copy: `copy_shared_buffer` of the input unchanged (Copy launches nothing in 0.32.x);
#   NumberOfElements: host arithmetic on shapes into a scalar, no kernel;
#   Reshape, Flatten, Unflatten (`reshape_gpu`) and View (a dtype reinterpretation) share the buffer whenever the
#     input's strides allow it, and copy only when they do not (a reshape of a transposed array; a View to a wider
#     dtype of a non-contiguous array). The export has no strides, so they count as views, as in the benchmark.
# Not views: Contiguous (copies unless its input is already contiguous), Full and AsType (a copy kernel), and
# DynamicSlice (a copy kernel, unlike Slice).
VIEWS: frozenset[str] = frozenset({
    "Reshape", "Flatten", "Unflatten", "View", "Transpose", "Slice", "Broadcast", "BroadcastAxes", "ExpandDims",
    "Squeeze", "Split", "AsStrided", "StopGradient", "Depends", "Copy", "NumberOfElements",
})

# Dtype::Val order (mlx/dtype.h) -> (name as mlx prints it, item size in bytes)
_DTYPES: tuple[tuple[str, int], ...] = (
    ("bool", 1), ("uint8", 1), ("uint16", 2), ("uint32", 4), ("uint64", 8), ("int8", 1), ("int16", 2),
    ("int32", 4), ("int64", 8), ("float16", 2), ("float32", 4), ("float64", 8), ("bfloat16", 2), ("complex64", 8),
)
_ITEMSIZE: dict[str, int] = dict(_DTYPES)

_TESTED_MLX = (0, 32, 4)


def _nbytes(spec: Spec) -> int:
    shape, dtype = spec
    return math.prod(shape) * _ITEMSIZE[dtype]


def dispatches(nodes: Iterable[Node]) -> int:
    """Nodes that launch work (everything but `VIEWS`)."""
    return sum(1 for n in nodes if n.primitive not in VIEWS)


def bytes_moved(nodes: Iterable[Node], touched_only: bool = False) -> int:
    """Sum over the dispatches of the bytes of every input and every output (an input passed twice counts twice).

    touched_only: count what a gather or an in-place update touches rather than its operands' full sizes: a
    Gather / GatherAxis source at its output's element count; a GatherQMM / GatherMM weight (and scales, biases)
    at min(experts, indices) / experts of its size (the experts its right-hand indices can select); a SliceUpdate /
    DynamicSliceUpdate destination and output at the update's size (the destination donated, as a KV-cache write
    is)."""
    nodes = [n for n in nodes if n.primitive not in VIEWS]
    if not touched_only:
        return sum(_nbytes(s) for n in nodes for s in n.inputs + n.outputs)
    return sum(_touched_bytes(n) for n in nodes)


def _touched_bytes(n: Node) -> int:
    ins = [_nbytes(s) for s in n.inputs]
    outs = [_nbytes(s) for s in n.outputs]
    if n.primitive in ("Gather", "GatherAxis") and n.inputs:
        ins[0] = min(ins[0], math.prod(n.outputs[0][0]) * _ITEMSIZE[n.inputs[0][1]])
    elif n.primitive in ("GatherQMM", "GatherMM") and len(n.inputs) >= 4:
        experts = math.prod(n.inputs[1][0][:-2])
        selected = min(experts, math.prod(n.inputs[-1][0]))
        for k in range(1, len(n.inputs) - 2 if n.primitive == "GatherQMM" else 2):
            ins[k] = ins[k] * selected // max(experts, 1)
    elif n.primitive in ("SliceUpdate", "DynamicSliceUpdate") and len(n.inputs) >= 2:
        ins[0] = outs[0] = ins[1]
    return sum(ins) + sum(outs)


def by_primitive(nodes: Iterable[Node]) -> dict[str, int]:
    """Dispatches per primitive name, custom kernels by their kernel name; most frequent first."""
    counts = Counter(n.name if n.primitive == "CustomKernel" and n.name else n.primitive
                     for n in nodes if n.primitive not in VIEWS)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------------------------------------------------------
# tracing


# `mx.contiguous` cannot be exported (0.32.4): while tracing it becomes `mx.depends(x, sentinel)`, a Depends node
# whose second input is this zero-size constant, reported as Contiguous. The shape is one no model builds.
_SENTINEL_SPEC: Spec = ((0, 7, 1, 3, 1, 5), "uint16")
_sentinel: list[mx.array] = []


def _contiguous_marker(a, allow_col_major: bool = False, *, stream=None):
    if not _sentinel:
        s = mx.zeros(_SENTINEL_SPEC[0], dtype=mx.uint16)
        mx.eval(s)
        _sentinel.append(s)
    return mx.depends(a, _sentinel[0])


def _check_mlx() -> None:
    version = tuple(int(p) for p in mx.__version__.split(".")[:3] if p.isdigit())
    if version < _TESTED_MLX:
        raise GraphError(f"mlx_qwen36.graph needs MLX >= {'.'.join(map(str, _TESTED_MLX))} (export callbacks, "
                         f"CustomKernel export without Metal); this is MLX {mx.__version__}")
    if version[:2] != _TESTED_MLX[:2]:
        warnings.warn(f"mlx_qwen36.graph was checked against MLX {'.'.join(map(str, _TESTED_MLX))}; with MLX "
                      f"{mx.__version__} the set of view primitives and the export records may differ",
                      stacklevel=3)


def _flat_fn(fn: Callable, args: tuple) -> Callable:
    for i, a in enumerate(args):
        if not isinstance(a, mx.array):
            raise TypeError(f"trace: argument {i} is a {type(a).__name__}, not an mx.array (close over it instead)")

    def flat(*xs):
        arrays = [v for _, v in tree_flatten(fn(*xs)) if isinstance(v, mx.array)]
        if not arrays:
            raise GraphError("trace: the function returned no arrays")
        return arrays

    return flat


def _export(target, fn: Callable, args: tuple) -> None:
    _check_mlx()
    flat = _flat_fn(fn, args)
    original = mx.contiguous
    mx.contiguous = _contiguous_marker
    try:
        mx.export_function(target, flat, *args)
    except ValueError as e:
        if "[export_function]" not in str(e):
            raise
        raise GraphError(f"MLX {mx.__version__} could not export the graph: {e}") from e
    finally:
        mx.contiguous = original


# Serialized names that stand for several primitives (export.cpp's PrimitiveFactory remaps MLX's `name()` to one
# key), told apart by the enum or bool that leads their state: each Node carries MLX's own name, as
# `mx.export_to_dot` prints it ("Sum", "Rsqrt", "CumSum", "LeftShift"), not the serialized key.
_NAME_BY_STATE: dict[str, tuple[str, ...]] = {
    "Reduce": ("And", "Or", "Sum", "Prod", "Min", "Max"),  # Reduce::ReduceType
    "Scan": ("CumMax", "CumMin", "CumSum", "CumProd", "CumLogAddExp"),  # Scan::ReduceType
    "Log": ("Log2", "Log10", "Log"),  # Log::Base
    "BitwiseBinary": ("BitwiseAnd", "BitwiseOr", "BitwiseXor", "LeftShift", "RightShift"),  # BitwiseBinary::Op
    "Sqrt": ("Sqrt", "Rsqrt"),  # recip
    "Equal": ("Equal", "NaNEqual"),  # equal_nan
}


def _display_name(serialized: str, state: list) -> str:
    names = _NAME_BY_STATE.get(serialized)
    if names is None:
        return serialized
    try:
        return names[int(state[0])]
    except (IndexError, TypeError, ValueError):
        raise GraphError(f"a {serialized} whose state {state!r} does not say which one it is") from None


@dataclass
class _Raw:
    primitive: str
    name: str | None
    in_ids: list
    inputs: list[Spec]
    out_ids: list
    outputs: list[Spec]


def _finish(raw: list[_Raw], known: set, constants: set) -> list[Node]:
    """Raw tape records -> Nodes: multi-output primitives once, Contiguous markers restored, every input checked to
    be a function input, a constant or an earlier node's output."""
    nodes: list[Node] = []
    seen: set = set()
    known = set(known)
    for r in raw:
        for i in r.in_ids:
            if i not in known:
                raise GraphError(f"{r.primitive} reads an array that no earlier record defines: the export format "
                                 f"is not the one this module reads")
        key = tuple(r.out_ids)
        if key in seen:
            continue
        seen.add(key)
        known.update(r.out_ids)
        inputs, primitive = tuple(r.inputs), r.primitive
        if (primitive == "Depends" and len(inputs) == 2 and inputs[1] == _SENTINEL_SPEC
                and r.in_ids[1] in constants):
            primitive, inputs = "Contiguous", inputs[:1]
        nodes.append(Node(primitive, r.name, inputs, tuple(r.outputs)))
    return nodes


def _dtype_name(dtype) -> str:
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in _ITEMSIZE:
        raise GraphError(f"unknown dtype {dtype}")
    return name


def trace(fn: Callable, *args: mx.array) -> list[Node]:
    """The graph fn(*args) builds, one Node per primitive (multi-output primitives once), in tape order, read from an
    `mx.export_function` of fn (to a callback: no file, constants are not copied).

    fn returns an array or any list / tuple / dict tree of arrays (non-array leaves are dropped): return everything
    the step produces (logits and the updated cache arrays), or the work behind what is left out is not traced."""
    records: list[dict[str, Any]] = []
    _export(records.append, fn, args)
    known: set = set()
    constants: set = set()
    raw: list[_Raw] = []
    try:
        for rec in records:
            kind = rec["type"]
            if kind == "inputs":
                known.update(n for n, _, _ in rec["inputs"])
            elif kind == "constants":
                constants.update(n for n, _ in rec["constants"])
            elif kind == "primitive":
                name = rec["name"]
                kernel = None
                if name == "CustomKernel":
                    kernel = rec["arguments"][0]
                    if not isinstance(kernel, str):
                        raise GraphError("CustomKernel record without its kernel name")
                ins = [(n, (tuple(s), _dtype_name(d))) for n, s, d in rec["inputs"]]
                outs = [(n, (tuple(s), _dtype_name(d))) for n, s, d in rec["outputs"]]
                raw.append(_Raw(_display_name(name, rec["arguments"]), kernel, [i for i, _ in ins], [s for _, s in ins],
                                [i for i, _ in outs], [s for _, s in outs]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise GraphError(f"MLX {mx.__version__}'s export records are not in the form this module reads "
                         f"({type(e).__name__}: {e})") from e
    known |= constants
    return _finish(raw, known, constants)


def trace_file(fn: Callable, *args: mx.array, path: str | os.PathLike | None = None) -> list[Node]:
    """`trace`, through an `.mlxfn` file (written to `path`, or a temporary file): closed-over constants are written
    with their data, so prefer `trace` for large models."""
    if path is not None:
        _export(str(path), fn, args)
        return read_mlxfn(path)
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "graph.mlxfn")
        _export(file, fn, args)
        return read_mlxfn(file)


# ---------------------------------------------------------------------------------------------------------------
# .mlxfn reader (mlx/export.cpp: FunctionExporter::export_function, ImportedFunction::ImportedFunction)

# Versions whose files this reader was checked against (the header's first string is the writer's version).
MLXFN_VERSIONS: frozenset[str] = frozenset({"0.32.4"})

# State encodings (export.cpp `serialize`): arithmetic types little-endian at their size, enums as int32, a string
# and any container as a uint64 count then the items, pairs / tuples field by field, nullptr as nothing, optional
# as a bool then the value, a ScalarArg variant as an int32 tag (0 int, 1 float, 2 bool) then the value, Dtype as
# int32 Dtype::Val then uint8 size.
I32, I64, U64, F32, F64, BOOL, ENUM = "i", "q", "Q", "f", "d", "?", "i"
DTYPE, STR, VARIANT = "dtype", "str", "variant"


def _vec(t):
    return ("vec", t)


def _opt(t):
    return ("opt", t)


def _tup(*ts):
    return ("tup", ts)


SHAPE = INTS = _vec(I32)

# name as serialized (PrimitiveFactory keys: Reduce for Sum/Max/..., Scan for CumSum/..., Log for Log2/Log10, Sqrt
# for Rsqrt, Equal for NaNEqual, BitwiseBinary for BitwiseAnd/...) -> the fields of its state(), from the 0.32.4
# headers (primitives.h, fast_primitives.h). An empty tuple: no state.
_NO_STATE = (
    "Abs", "Add", "ArcCos", "ArcCosh", "ArcSin", "ArcSinh", "ArcTan", "ArcTan2", "ArcTanh", "Ceil", "Conjugate",
    "Copy", "Cos", "Cosh", "Depends", "Divide", "DivMod", "Erf", "ErfInv", "Exp", "Expm1", "Floor", "FloorDivide",
    "Full", "Greater", "GreaterEqual", "Imag", "Less", "LessEqual", "Log1p", "LogicalNot", "LogicalAnd", "LogicalOr",
    "LogAddExp", "LogSumExp", "MaskedScatter", "Matmul", "Maximum", "Minimum", "Multiply", "Negative", "NotEqual",
    "Power", "QRF", "Real", "Remainder", "Round", "Select", "Sigmoid", "Sign", "Sin", "Sinh", "Square",
    "StopGradient", "Subtract", "Tan", "Tanh",
    # fast primitives whose state() is (nullptr) or std::monostate: written as nothing (never exported on Linux,
    # where they fall back to plain ops)
    "GatedDeltaUpdate", "GatedDeltaUpdateVJP", "CrossEntropy", "CrossEntropyVJP",
)
STATE_LAYOUTS: dict[str, tuple] = {name: () for name in _NO_STATE} | {
    "AddMM": (F32, F32),
    "Arange": (F64, F64, F64),
    "ArgPartition": (I32, I32),
    "ArgReduce": (ENUM, I32),
    "ArgSort": (I32,),
    "AsType": (DTYPE,),
    "AsStrided": (SHAPE, _vec(I64), U64),
    "BitwiseBinary": (ENUM,),
    "BlockMaskedMM": (I32,),
    "Broadcast": (SHAPE,),
    "BroadcastAxes": (INTS,),
    "Concatenate": (I32,),
    "Convolution": (INTS, INTS, INTS, INTS, INTS, I32, BOOL),
    "DynamicSlice": (INTS, SHAPE),
    "DynamicSliceUpdate": (INTS,),
    "Equal": (BOOL,),
    "ExpandDims": (INTS,),
    "FFT": (_vec(U64), BOOL, BOOL, BOOL),
    "Flatten": (I32, I32),
    "Gather": (INTS, SHAPE),
    "GatherAxis": (I32,),
    "GatherMM": (BOOL, BOOL),
    "GatherQMM": (I32, I32, ENUM, BOOL, BOOL, BOOL),
    "Hadamard": (F32,),
    "Log": (ENUM,),
    "NumberOfElements": (INTS, BOOL, DTYPE),
    "Pad": (INTS, SHAPE, SHAPE),
    "Partition": (I32, I32),
    "QuantizedMatmul": (I32, I32, ENUM, BOOL),
    "RandomBits": (SHAPE, I32),
    "Reduce": (ENUM, INTS),
    "Reshape": (SHAPE,),
    "Scan": (ENUM, I32, BOOL, BOOL),
    "Scatter": (ENUM, INTS),
    "ScatterAxis": (ENUM, I32),
    "SearchSorted": (BOOL,),
    "Slice": (SHAPE, SHAPE, SHAPE),
    "SliceUpdate": (ENUM, SHAPE, SHAPE, SHAPE),
    "Softmax": (BOOL,),
    "Sort": (I32,),
    "Split": (SHAPE, I32),
    "Sqrt": (BOOL,),
    "Squeeze": (INTS,),
    "Transpose": (INTS,),
    "Unflatten": (I32, SHAPE),
    "View": (DTYPE,),
    "SVD": (BOOL,),
    "Inverse": (BOOL, BOOL),
    "Cholesky": (BOOL,),
    "Eig": (BOOL,),
    "Eigh": (STR, BOOL),
    # fast primitives (the leading nullptr of their state writes nothing)
    "Quantize": (I32, I32, ENUM, BOOL),
    "RMSNorm": (F32,),
    "RMSNormVJP": (F32,),
    "LayerNorm": (F32,),
    "LayerNormVJP": (F32,),
    "RoPE": (I32, BOOL, F32, F32, BOOL),
    "ScaledDotProductAttention": (F32, BOOL, BOOL, BOOL, BOOL),
    "ScaledDotProductAttentionVJP": (F32, BOOL, BOOL),
    # name, source, grid, threadgroup, shape_infos, ensure_row_contiguous, init_value, scalar_arguments,
    # is_precompiled, shared_memory, compile_options (CompileOptions::Data = int)
    "CustomKernel": (STR, STR, _tup(I32, I32, I32), _tup(I32, I32, I32), _vec(_tup(BOOL, BOOL, BOOL)), BOOL,
                     _opt(F32), _vec(VARIANT), BOOL, I32, I32),
}

_MAX_NAME = 64


class _Reader:
    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def tell(self) -> int:
        return self.f.tell()

    def take(self, n: int) -> bytes:
        if n < 0 or self.tell() + n > self.size:
            raise GraphError(f"truncated .mlxfn file (wanted {n} bytes at offset {self.tell()})")
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise GraphError(f"truncated .mlxfn file (a constant of {n} bytes at offset {self.tell()})")
        self.f.seek(n, os.SEEK_CUR)

    def scalar(self, fmt: str):
        if fmt == BOOL:
            b = self.take(1)[0]
            if b > 1:
                raise GraphError(f"byte {b} where a bool belongs (offset {self.tell() - 1})")
            return bool(b)
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, item_size: int = 1) -> int:
        n = self.scalar(U64)
        if n * item_size > self.size - self.tell():
            raise GraphError(f"a count of {n} at offset {self.tell() - 8} runs past the end of the file")
        return n

    def string(self) -> str:
        return self.take(self.count()).decode("utf-8", errors="replace")

    def dtype(self) -> str:
        val, size = self.scalar(I32), self.scalar("B")
        if not 0 <= val < len(_DTYPES) or _DTYPES[val][1] != size:
            raise GraphError(f"invalid dtype (val {val}, size {size}) at offset {self.tell() - 5}")
        return _DTYPES[val][0]

    def shape(self) -> tuple[int, ...]:
        n = self.count(4)
        return struct.unpack(f"<{n}i", self.take(4 * n))

    def ids(self) -> list[int]:
        n = self.count(8)
        return list(struct.unpack(f"<{n}Q", self.take(8 * n)))

    def value(self, spec):
        if isinstance(spec, str):
            if spec == STR:
                return self.string()
            if spec == DTYPE:
                return self.dtype()
            if spec == VARIANT:
                tag = self.scalar(I32)
                if tag not in (0, 1, 2):
                    raise GraphError(f"invalid variant tag {tag} at offset {self.tell() - 4}")
                return self.scalar((I32, F32, BOOL)[tag])
            return self.scalar(spec)
        kind, arg = spec
        if kind == "vec":
            return [self.value(arg) for _ in range(self.count())]
        if kind == "opt":
            return self.value(arg) if self.scalar(BOOL) else None
        return tuple(self.value(t) for t in arg)


def _read_function(r: _Reader, constants_seen: dict[int, Spec]) -> list[Node]:
    r.value(_vec(STR))  # keyword-argument names
    input_ids = r.ids()
    n_inputs = r.count()
    if n_inputs != len(input_ids):
        raise GraphError(f"{len(input_ids)} input ids but {n_inputs} input arrays")
    specs: dict[int, Spec] = {}
    for i in input_ids:
        specs[i] = (r.shape(), r.dtype())
    r.ids()  # output ids
    constants: set[int] = set()
    raw: list[_Raw] = []
    for k in range(r.count()):
        try:
            _read_entry(r, specs, constants, constants_seen, raw)
        except GraphError as e:
            last = f"; the last primitive read was a {raw[-1].primitive}: is its state layout right?" if raw else ""
            raise GraphError(f"{e} (tape entry {k}{last})") from None
    return _finish(raw, set(specs), constants)


def _read_entry(r: _Reader, specs: dict[int, Spec], constants: set[int], constants_seen: dict[int, Spec],
                raw: list[_Raw]) -> None:
    """One tape entry: a primitive (appended to raw), a constant or a function input."""
    array_id = r.scalar(U64)
    if r.scalar(BOOL):  # has a primitive
        in_ids = r.ids()
        r.take(12)  # stream: index, device type, device index (int32 each)
        name = r.string()
        if not name or len(name) > _MAX_NAME or not name.isidentifier():
            raise GraphError(f"unreadable primitive name {name[:_MAX_NAME]!r} at offset {r.tell()}")
        layout = STATE_LAYOUTS.get(name)
        if layout is None:
            raise GraphError(f"unknown primitive {name!r} in the .mlxfn file: its state layout is not in "
                             f"mlx_qwen36.graph.STATE_LAYOUTS")
        try:
            raw.append(_read_primitive(r, name, layout, array_id, in_ids, specs))
        except GraphError as e:
            raise GraphError(f"{e}, in a {name} record: is its layout in STATE_LAYOUTS right?") from None
    elif r.scalar(BOOL):  # a constant: its data follows the first time it is written
        if array_id not in constants_seen:
            spec = (r.shape(), r.dtype())
            r.skip(_nbytes(spec))
            constants_seen[array_id] = spec
        specs[array_id] = constants_seen[array_id]
        constants.add(array_id)
    elif array_id not in specs:
        raise GraphError(f"array {array_id} is neither a primitive's output, a constant nor an input")


def _read_primitive(r: _Reader, name: str, layout: tuple, array_id: int, in_ids: list[int],
                    specs: dict[int, Spec]) -> _Raw:
    state = [r.value(t) for t in layout]
    n_siblings = r.scalar(U64)  # the other outputs
    if n_siblings == 0:
        out_ids, outs = [array_id], [(r.shape(), r.dtype())]
    else:
        out_ids = r.ids()
        shapes = [r.shape() for _ in range(r.count())]
        dtypes = [r.dtype() for _ in range(r.count())]
        if not (len(out_ids) == len(shapes) == len(dtypes) == n_siblings + 1) or array_id not in out_ids:
            raise GraphError(f"inconsistent outputs at offset {r.tell()}")
        outs = list(zip(shapes, dtypes))
    try:
        ins = [specs[i] for i in in_ids]
    except KeyError:
        raise GraphError(f"an input no earlier record defines (offset {r.tell()})") from None
    specs.update(zip(out_ids, outs))
    return _Raw(_display_name(name, state), state[0] if name == "CustomKernel" else None, in_ids, ins, out_ids, outs)


def read_mlxfn(path: str | os.PathLike, function: int = 0) -> list[Node]:
    """The nodes of one function (by export order) of an `.mlxfn` file written by a version in `MLXFN_VERSIONS`."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, size)
        version = r.string()
        if version not in MLXFN_VERSIONS:
            raise GraphError(f"{os.fspath(path)} was written by MLX {version!r}; this reader knows the state "
                             f"layouts of MLX {', '.join(sorted(MLXFN_VERSIONS))} only")
        count = r.scalar(I32)
        r.scalar(BOOL)  # shapeless
        r.string()  # metadata
        if not 0 <= function < count:
            raise GraphError(f"{os.fspath(path)} holds {count} function(s); asked for number {function}")
        constants_seen: dict[int, Spec] = {}
        for k in range(count):
            nodes = _read_function(r, constants_seen)
            if k == function:
                if k == count - 1 and r.tell() != size:
                    raise GraphError(f"{size - r.tell()} bytes left after the last function")
                return nodes
    raise AssertionError("unreachable")
