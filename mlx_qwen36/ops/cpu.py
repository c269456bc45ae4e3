"""The CPU back end's forms of the hot ops: a weight layout for its BLAS and a second thread.

`relayout_for_cpu(model)`: MLX's CPU wheel multiplies with the reference BLAS, whose `x @ W` is about twice as fast
when W is stored [in, out] as when it is the checkpoint's [out, in] read transposed (measured on a 2-core x86 box:
GEMV 6.0 vs 3.1 GB/s, GEMM 2.5-3.0 vs 1.3-1.6 GFLOP/s). Every unquantized float32 linear and expert weight is
stored once in that order and exposed as a transposed view: parameters keep their shapes and values, the module
tree and checkpoints are unchanged, and no weight exists twice. Linear layers become `CPULinear` (same object).

Two threads: the CPU back end runs each MLX stream on one thread, so a second stream (`worker_stream`) doubles the
arithmetic available on a 2-core machine. Prefill runs half of every large matmul's rows, of the sorted expert
pairs, of the GDN heads and of the attention heads on it; decode splits only the lm_head GEMV (by its input
dimension), the one weight large enough to pay for the extra graph nodes. MLX_QWEN36_CPU_THREADS=1 turns it off.

Nothing here is used off the CPU: the op layer (`mlx_qwen36.ops`) calls these only when the default device is the CPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from . import kernels

__all__ = ["CPULinear", "cpu_gather_needs_fp32", "gather_matmul_fp32", "matmul", "relayout_for_cpu", "split_rows",
           "stored_transpose", "worker_stream"]


# ---------------------------------------------------------------------------------------------------------------
# weight layout


def stored_transpose(module: nn.Module) -> mx.array | None:
    """The contiguous buffer ([in, out], or [E, in, out] for experts) behind `module.weight` after
    `relayout_for_cpu`, while that weight is still the module's; None otherwise."""
    entry = module.__dict__.get("_weight_t")
    if entry is not None and entry[0] is module.get("weight"):
        return entry[1]
    return None


class CPULinear(nn.Linear):
    """A bias-free or biased nn.Linear after `relayout_for_cpu`: multiplies by the stored [in, out] buffer (no
    transpose node in the graph), split over the CPU's two threads where that pays (`matmul`). Its parameters are
    nn.Linear's, unchanged."""

    def __call__(self, x: mx.array) -> mx.array:
        entry = self.__dict__.get("_weight_t")
        if entry is None or entry[0] is not self.get("weight"):  # the weight was replaced since: plain Linear
            return nn.Linear.__call__(self, x)
        y = matmul(x, entry[1], entry[2])
        return y + self["bias"] if "bias" in self else y


def cpu_gather_needs_fp32(dtype: mx.Dtype) -> bool:
    """MLX's CPU `gather_mm` takes only float32: a bf16/fp16 expert stack is computed in fp32 there."""
    return dtype != mx.float32 and mx.default_device() == mx.cpu and not kernels.metal_graph()


def gather_matmul_fp32(x: mx.array, weight: mx.array, indices: mx.array, sorted_indices: bool = False,
                       lhs_indices: mx.array | None = None) -> mx.array:
    """`gather_mm(x, weight[E, out, in]ᵀ)` in fp32 for a bf16/fp16 stack on the CPU, in x's dtype.

    When fewer (token, expert) pairs than experts are routed (decode, short prompts), the selected experts are
    gathered first and only they are cast: casting the whole stack would convert every expert per call (256
    experts of a layer: ~1 GB of fp32 per matmul). `lhs_indices` is always the identity here (`moe._lhs_indices`),
    so a broadcasting matmul over the gathered experts is the same product.
    """
    if indices.size < weight.shape[0]:
        w = weight[indices].astype(mx.float32).swapaxes(-1, -2)  # [*indices.shape, in, out]
        return (x.astype(mx.float32) @ w).astype(x.dtype)
    w = weight.astype(mx.float32).swapaxes(-1, -2)
    y = mx.gather_mm(x.astype(mx.float32), w, lhs_indices=lhs_indices, rhs_indices=indices,
                     sorted_indices=sorted_indices)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# two CPU threads

MIN_SPLIT_ROWS = 16  # matmuls with fewer rows than twice this stay on one thread
SPLIT_GEMV_BYTES = 128 << 20  # one-row matmuls split their weight above this size (the lm_head)
_worker = threading.local()  # per thread: MLX streams belong to the thread that made them


def worker_stream() -> mx.Stream | None:
    """A second CPU stream, i.e. a second thread, to run half of the large matmuls on: MLX's CPU back end runs each
    stream on one thread and the BLAS it calls is single-threaded. None off the CPU, on one core, or with
    MLX_QWEN36_CPU_THREADS=1."""
    if (mx.default_device() != mx.cpu or (os.cpu_count() or 1) < 2 or os.environ.get("MLX_QWEN36_CPU_THREADS") == "1"
            or kernels.metal_graph()):
        return None
    stream = getattr(_worker, "stream", None)
    if stream is None:
        stream = _worker.stream = mx.new_stream(mx.cpu)
    return stream


def split_rows(fn: Callable[..., mx.array], *arrays: mx.array) -> mx.array:
    """`fn(*arrays)` with every array cut in two along axis 0, the halves run on two CPU threads and the results
    joined along axis 0 (fn must treat rows independently)."""
    stream = worker_stream()
    n = arrays[0].shape[0]
    if stream is None or n < 2 * MIN_SPLIT_ROWS:
        return fn(*arrays)
    h = n // 2
    first = fn(*(a[:h] for a in arrays))
    with mx.stream(stream):
        second = fn(*(a[h:] for a in arrays))
    return mx.concatenate([first, second], axis=0)


def matmul(x: mx.array, wt: mx.array, halves: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """x [..., K] @ wt [K, N] on two CPU threads: by rows for prefill, by K for a huge one-row product (the lm_head
    GEMV, whose weight `halves` along K are precomputed views)."""
    K, N = wt.shape
    rows = x.size // K
    if rows >= 2 * MIN_SPLIT_ROWS and worker_stream() is not None:
        y = split_rows(lambda a: a @ wt, x.reshape(rows, K))
        return y.reshape(*x.shape[:-1], N)
    stream = worker_stream()
    if halves is not None and stream is not None:
        h = halves[0].shape[0]
        return x[..., :h] @ halves[0] + mx.matmul(x[..., h:], halves[1], stream=stream)
    return x @ wt


def _store_transposed(module: nn.Module, axes: tuple[int, int]) -> int:
    buf = mx.contiguous(module.weight.swapaxes(*axes))
    mx.eval(buf)
    view = buf.swapaxes(*axes)  # the parameter: same shape and values as before
    mx.eval(view)  # a view, but still a graph node until evaluated (and graph nodes belong to their thread)
    module.weight = view
    halves = None
    if buf.ndim == 2 and buf.nbytes >= SPLIT_GEMV_BYTES:  # K halves (rows of the [in, out] buffer) for `matmul`
        h = buf.shape[0] // 2
        halves = (buf[:h], buf[h:])
        mx.eval(halves)
    object.__setattr__(module, "_weight_t", (view, buf, halves))
    return buf.nbytes


def relayout_for_cpu(model: nn.Module) -> int:
    """Store the float32 matmul weights [in, out] for the CPU BLAS (see the module docstring); returns the bytes moved.

    Idempotent; one weight is converted at a time, so the peak is one tensor above the model. Quantized layers and
    other dtypes are left as they are.
    """
    moved = 0
    for _, module in model.named_modules():
        if "weight" not in module or module.weight.dtype != mx.float32 or "_weight_t" in module.__dict__:
            continue
        if type(module) is nn.Linear:
            moved += _store_transposed(module, (0, 1))
            module.__class__ = CPULinear  # same object and parameters, reads the stored buffer
        elif getattr(module, "expert_stack", False):  # a SwitchLinear: [E, out, in]
            moved += _store_transposed(module, (-1, -2))
        elif isinstance(module, nn.Conv1d) and module.weight.shape[-1] == 1:
            moved += _store_transposed(module, (0, 2))  # depthwise taps [C, K, 1] -> [1, K, C] for the decode conv
    return moved
