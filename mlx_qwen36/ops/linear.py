"""Projections of one input through several linear layers, as one launch for a few rows of quantized weights.

`projections(x, layers)` is what a block's projections of the same input are (the GDN's four in_proj, attention's
q/k/v, the router and shared-expert gates, the dense MLP's gate/up): for a few rows of x (decode, speculative
verification) and affine 4/8-bit layers of one quantization, the Metal kernel `qmv` computes all of them in one
launch; with `gate` the input is x * sigmoid(gate) first (attention's output gate), with `residual` the skip
connection is added to the (single) output. Elsewhere each layer runs as it is (MLX's quantized matmul, the CPU
layout's matmul).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import kernels

MAX_ROWS = 8  # rows of x the matvec kernel serves (decode and speculative verification); more: MLX's matmuls
MAX_LAYERS = 4
QMV = kernels.Kernel(
    "qmv", ["x", "gate", "residual", "w0", "s0", "b0", "w1", "s1", "b1", "w2", "s2", "b2", "w3", "s3", "b3"], ["y"])


def projections(x: mx.array, layers: list[nn.Module], gate: mx.array | None = None,
                residual: mx.array | None = None) -> list[mx.array]:
    """[layer(x') for layer in layers], x' = x * sigmoid(gate) when `gate` is given; `residual` (one layer only)
    is added to the output. x [..., H] -> each [..., out_i]."""
    if residual is not None and len(layers) != 1:
        raise ValueError("a residual is added to one projection only")
    quant = _common_quantization(layers)
    rows = x.size // x.shape[-1]
    if quant is None or rows > MAX_ROWS or not mx.issubdtype(x.dtype, mx.floating) or len(layers) > MAX_LAYERS:
        return _modules(x, layers, gate, residual)
    bits, group = quant
    weights = tuple(a for layer in layers for a in (layer["weight"], layer["scales"], layer["biases"]))
    outs = tuple(layer["scales"].shape[0] for layer in layers)
    key = ("qmv", str(x.dtype), str(weights[1].dtype), rows, outs, bits, group, gate is not None,
           residual is not None)
    args = (x, gate, residual, *weights)
    y = kernels.dispatch("qmv", key, partial(_kernel, bits, group), partial(_reference, bits, group), args)
    return list(mx.split(y, list(_cumulative(outs)[:-1]), axis=-1)) if len(layers) > 1 else [y]


def _common_quantization(layers: list[nn.Module]) -> tuple[int, int] | None:
    """(bits, group size) when every layer is a bias-free affine 4/8-bit QuantizedLinear of the same quantization."""
    specs = set()
    for layer in layers:
        if not isinstance(layer, nn.QuantizedLinear) or "bias" in layer or getattr(layer, "mode", "affine") != "affine":
            return None
        specs.add((layer.bits, layer.group_size))
    if len(specs) != 1:
        return None
    bits, group = specs.pop()
    return (bits, group) if bits in (4, 8) and group in (32, 64, 128) else None


def _cumulative(sizes: tuple[int, ...]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        total += s
        out.append(total)
    return out


def _modules(x: mx.array, layers: list[nn.Module], gate: mx.array | None,
             residual: mx.array | None) -> list[mx.array]:
    if gate is not None:
        x = x * mx.sigmoid(gate)
    ys = [layer(x) for layer in layers]
    if residual is not None:
        ys[0] = residual + ys[0]
    return ys


def _reference(bits: int, group: int, x: mx.array, gate: mx.array | None, residual: mx.array | None,
               *weights: mx.array) -> mx.array:
    """What the kernel computes, in MLX ops on the same arrays."""
    if gate is not None:
        x = x * mx.sigmoid(gate)
    ys = [mx.quantized_matmul(x, *weights[i:i + 3], transpose=True, group_size=group, bits=bits)
          for i in range(0, len(weights), 3)]
    y = mx.concatenate(ys, axis=-1) if len(ys) > 1 else ys[0]
    return residual + y if residual is not None else y


def _kernel(bits: int, group: int, x: mx.array, gate: mx.array | None, residual: mx.array | None,
            *weights: mx.array) -> mx.array:
    H = x.shape[-1]
    rows = x.size // H
    outs = [weights[i + 1].shape[0] for i in range(0, len(weights), 3)]
    total = sum(outs)
    none = (kernels.absent(mx.uint32), kernels.absent(weights[1].dtype), kernels.absent(weights[1].dtype))
    padded = list(weights) + list(none) * (MAX_LAYERS - len(weights) // 3)
    sizes = outs + [0] * (MAX_LAYERS - len(outs))
    (y,) = QMV(
        inputs=[x, kernels.absent(x.dtype) if gate is None else gate,
                kernels.absent(x.dtype) if residual is None else residual, *padded],
        output_shapes=[(*x.shape[:-1], total)], output_dtypes=[x.dtype],
        grid=(32, total, rows), threadgroup=(32, 4, 1),
        template=[("T", x.dtype), ("H", H), ("BITS", bits), ("GS", group),
                  *((f"R{i}", s) for i, s in enumerate(sizes)), ("GATED", gate is not None),
                  ("RESIDUAL", residual is not None)],
    )
    return y
