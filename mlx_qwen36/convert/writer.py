"""A safetensors writer that evaluates and writes one tensor at a time.

The header is written from the lazy arrays' shapes and dtypes alone; each tensor is then computed, written and
released before the next, so converting never holds more than one tensor (and its sources) in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

DTYPES = {mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.float16: "F16",
          mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32", mx.float32: "F32", mx.uint64: "U64",
          mx.int64: "I64"}


Tensor = mx.array | list[mx.array]


def shape_of(t: Tensor) -> tuple[int, ...]:
    """A tensor, or a list of equal slices stacked along a new axis 0 (written slice by slice)."""
    return tuple(t.shape) if isinstance(t, mx.array) else (len(t), *t[0].shape)


def nbytes_of(t: Tensor) -> int:
    return t.nbytes if isinstance(t, mx.array) else sum(p.nbytes for p in t)


def dtype_of(t: Tensor) -> mx.Dtype:
    return t.dtype if isinstance(t, mx.array) else t[0].dtype


def write_safetensors(path: Path, tensors: list[tuple[str, Tensor]], metadata: dict[str, str] | None = None,
                      on_written: Callable[[int], None] | None = None) -> None:
    """Write `tensors` in order; the list is consumed (entries dropped once written) so memory is released."""
    header: dict = {"__metadata__": metadata or {"format": "mlx"}}
    offset = 0
    for name, t in tensors:
        n = nbytes_of(t)
        header[name] = {"dtype": DTYPES[dtype_of(t)], "shape": list(shape_of(t)), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        while tensors:
            _, t = tensors.pop(0)
            for piece in [t] if isinstance(t, mx.array) else t:
                _write(f, piece, on_written)
            del t


def _write(f, t: mx.array, on_written: Callable[[int], None] | None) -> None:
    t = mx.contiguous(t)
    mx.eval(t)
    f.write(np.asarray(t.view(mx.uint8) if t.dtype != mx.bool_ else t).data)
    if on_written is not None:
        on_written(t.nbytes)
    del t
    mx.clear_cache()  # hand the buffer back now: the allocator cache would otherwise grow RSS
