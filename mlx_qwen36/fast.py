"""Fast inference paths that sit on top of the model without changing its parameters: a weight layout and two
threads for the CPU back end, and a compiled decode step.

`relayout_for_cpu(model)`: MLX's CPU wheel multiplies with the reference BLAS, whose `x @ W` is about twice as fast
when W is stored [in, out] as when it is the checkpoint's [out, in] read transposed (measured on a 2-core x86 box:
GEMV 6.0 vs 3.1 GB/s, GEMM 2.5-3.0 vs 1.3-1.6 GFLOP/s). Every unquantized float32 linear and expert weight is
stored once in that order and exposed as a transposed view: parameters keep their shapes and values, the module
tree and checkpoints are unchanged, and no weight exists twice. Linear layers become `CPULinear` (same object).

Two threads: the CPU back end runs each MLX stream on one thread, so a second stream (`worker_stream`) doubles the
arithmetic available on a 2-core machine. Prefill runs half of every large matmul's rows, of the sorted expert
pairs, of the GDN heads and of the attention heads on it; decode splits only the lm_head GEMV (by its input
dimension), the one weight large enough to pay for the extra graph nodes. MLX_QWEN36_CPU_THREADS=1 turns it off.

`make_decode_step(model)`: one decoded token as a single `mx.compile`d graph (elementwise chains fused, host work
paid once per trace), kept 2-D from the embedding to the logits. The KV caches are written at a traced offset, so
the trace is reused until a KV buffer grows (every `KVCache.step` tokens); the caches end up exactly as the plain
`model(tokens, cache)` call leaves them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache, GDNCache

__all__ = ["CPULinear", "decode_step", "make_decode_step", "relayout_for_cpu", "split_rows", "stored_transpose",
           "worker_stream"]


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


# ---------------------------------------------------------------------------------------------------------------
# two CPU threads

MIN_SPLIT_ROWS = 16  # matmuls with fewer rows than twice this stay on one thread
SPLIT_GEMV_BYTES = 128 << 20  # one-row matmuls split their weight above this size (the lm_head)
_worker: list[mx.Stream] = []


def worker_stream() -> mx.Stream | None:
    """A second CPU stream, i.e. a second thread, to run half of the large matmuls on: MLX's CPU back end runs each
    stream on one thread and the BLAS it calls is single-threaded. None off the CPU, on one core, or with
    MLX_QWEN36_CPU_THREADS=1."""
    if mx.default_device() != mx.cpu or (os.cpu_count() or 1) < 2 or os.environ.get("MLX_QWEN36_CPU_THREADS") == "1":
        return None
    if not _worker:
        _worker.append(mx.new_stream(mx.cpu))
    return _worker[0]


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
    from .moe import SwitchLinear

    moved = 0
    for _, module in model.named_modules():
        if "weight" not in module or module.weight.dtype != mx.float32 or "_weight_t" in module.__dict__:
            continue
        if type(module) is nn.Linear:
            moved += _store_transposed(module, (0, 1))
            module.__class__ = CPULinear  # same object and parameters, reads the stored buffer
        elif isinstance(module, SwitchLinear):
            moved += _store_transposed(module, (-1, -2))
        elif isinstance(module, nn.Conv1d) and module.weight.shape[-1] == 1:
            moved += _store_transposed(module, (0, 2))  # depthwise taps [C, K, 1] -> [1, K, C] for the decode conv
    return moved


# ---------------------------------------------------------------------------------------------------------------
# compiled decode step


class _TracedKV:
    """A KVCache inside the compiled step: fixed-size buffers written at a traced offset, and a mask for the rest."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values

    def attention_mask(self, T: int) -> mx.array:
        """Valid rows of the buffer after this step's write: [capacity] bool (T = 1)."""
        return mx.arange(self.keys.shape[2]) <= self.offset


class _TracedGDN:
    def __init__(self, conv_state: mx.array, recurrent_state: mx.array):
        self.conv_state, self.recurrent_state, self.offset = conv_state, recurrent_state, 0


def _gdn_zeros(layer: nn.Module, B: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    la = layer.linear_attn
    conv = mx.zeros((B, la.conv_kernel - 1, la.conv_dim), dtype=dtype)
    state = mx.zeros((B, la.num_v_heads, la.head_k_dim, la.head_v_dim), dtype=mx.float32)
    return conv, state


def make_decode_step(model: nn.Module) -> Callable[[mx.array, list[Cache]], mx.array]:
    """`step(tokens [B, 1], cache) -> logits [B, 1, vocab]`, equal to `model(tokens, cache)` and updating `cache`
    the same way (lazily: evaluate the logits and `[c.state for c in cache]` as for the plain call)."""
    layers = model.layers

    def traced(tokens: mx.array, states: list[mx.array], offsets: list[mx.array]):
        caches, it, ot = [], iter(states), iter(offsets)
        for layer in layers:
            if layer.is_linear:
                caches.append(_TracedGDN(next(it), next(it)))
            else:
                caches.append(_TracedKV(next(it), next(it), next(ot)))
        # The model's forward for one token per row, kept 2-D ([B, H]) from the embedding to the logits.
        B = tokens.shape[0]
        h = model.model.embed_tokens(tokens.reshape(B))
        for layer, c in zip(layers, caches):
            h = layer.decode(h, c)
        h = model.model.norm(h)
        logits = model.lm_head(h) if "lm_head" in model else model.model.embed_tokens.as_linear(h)
        new = []
        for c in caches:
            new += [c.conv_state, c.recurrent_state] if isinstance(c, _TracedGDN) else [c.keys, c.values]
        return logits.reshape(B, 1, -1), new

    compiled = mx.compile(traced)  # weights are captured as constants: rebuild the step if they change

    def step(tokens: mx.array, cache: list[Cache]) -> mx.array:
        B, T = tokens.shape
        if T != 1:
            raise ValueError(f"the decode step takes one token per row, got {T}")
        dtype = model.model.embed_tokens.weight.dtype
        states, offsets = [], []
        for layer, c in zip(layers, cache):
            if isinstance(c, GDNCache):
                if c.conv_state is None:
                    c.conv_state, c.recurrent_state = _gdn_zeros(layer, B, dtype)
                states += [c.conv_state, c.recurrent_state]
            else:
                attn = layer.self_attn
                c.reserve(1, B, attn.num_kv_heads, attn.head_dim, attn.head_dim, dtype)
                states += [c.keys, c.values]
                offsets.append(mx.array(c.offset, dtype=mx.int32))
        logits, new = compiled(tokens, states, offsets)
        it = iter(new)
        for c in cache:
            if isinstance(c, GDNCache):
                c.conv_state, c.recurrent_state = next(it), next(it)
            else:
                c.keys, c.values = next(it), next(it)
            c.offset += 1
        return logits

    return step


def decode_step(model: nn.Module) -> Callable[[mx.array, list[Cache]], mx.array]:
    """`make_decode_step(model)`, made once per model and kept on it (each new step traces and compiles again)."""
    step = model.__dict__.get("_decode_step")
    if step is None:
        step = make_decode_step(model)
        object.__setattr__(model, "_decode_step", step)
    return step

