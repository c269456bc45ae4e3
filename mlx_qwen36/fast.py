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
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache, buffers
from .positions import text_position_ids

__all__ = ["CPULinear", "cpu_gather_needs_fp32", "decode_step", "gather_matmul_fp32", "make_decode_step",
           "relayout_for_cpu", "split_rows", "stored_transpose", "worker_stream"]


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
    return dtype != mx.float32 and mx.default_device() == mx.cpu


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


@dataclass(frozen=True)
class _Segment:
    """The layers one compiled call covers: the end of attention layer `close` (its o_proj and FFN), the GDN
    layers `linear`, then the projections of attention layer `open` (or, when None, the final norm)."""

    close: int | None
    linear: tuple[int, ...]
    open: int | None


def _segments(layers: list[nn.Module]) -> list[_Segment]:
    attention = [i for i, layer in enumerate(layers) if not layer.is_linear]
    bounds = [None, *attention, None]
    segments = []
    for close, open_ in zip(bounds[:-1], bounds[1:]):
        start = 0 if close is None else close + 1
        stop = len(layers) if open_ is None else open_
        segments.append(_Segment(close, tuple(range(start, stop)), open_))
    return segments


class _TracedGDN:
    """A GDNCache inside a compiled segment: the layer reads and replaces its states as on the real cache."""

    def __init__(self, conv_state: mx.array, recurrent_state: mx.array):
        self.conv_state, self.recurrent_state, self.offset = conv_state, recurrent_state, 0


def make_decode_step(model: nn.Module) -> Callable[..., mx.array]:
    """`step(tokens [B, 1], cache, rope_delta=0) -> logits [B, 1, vocab]`, equal to `model(tokens, cache)` and
    updating `cache` the same way (lazily: evaluate the logits and `[c.state for c in cache]` as for the plain call).

    The step is a chain of `mx.compile`d segments cut at the attention cores: each segment runs the end of one
    attention layer, the GDN layers after it and the projections of the next attention layer (the last one the
    final norm), with elementwise chains fused and host work paid once per trace. The attention cores (the KV write
    and SDPA over the cache) and the lm_head run between and after them uncompiled, so a growing KV buffer never
    changes a traced shape and nothing is traced again.
    Each segment's weights are inputs of its compiled function, not constants: weights replaced after the first
    call (`load_weights`, an adapter) are used from the next call on. The caches' dtypes come from the
    activations: a cache still empty takes the plain call, which creates its states from what the layers produce.

    `rope_delta` (an int or [B]) shifts the rotary position of every row: text decoded after an image sits at
    `cache offset + rope_delta` on all three M-RoPE axes, which is 1-D rotary at that position.
    """
    layers = model.layers
    segments = _segments(layers)

    def traced(segment: _Segment) -> Callable[[dict], dict]:
        def run(x: dict) -> dict:
            h = model.model.embed_tokens(x["tokens"]) if segment.close is None else x["h"]
            if segment.close is not None:
                layer = layers[segment.close]
                h = h + layer.self_attn.decode_out(x["o"], x["gate"])
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            states = iter(x["states"])
            out: dict = {"states": []}
            for i in segment.linear:
                c = _TracedGDN(next(states), next(states))
                h = layers[i].decode(h, c)
                out["states"] += [c.conv_state, c.recurrent_state]
            if segment.open is None:
                out["h"] = model.model.norm(h)
                return out
            layer = layers[segment.open]
            out["h"] = h
            out["q"], out["k"], out["v"], out["gate"] = layer.self_attn.decode_qkv(layer.input_layernorm(h),
                                                                                   x["position"])
            return out

        modules = [layers[i] for i in (segment.close, *segment.linear) if i is not None]
        modules += [model.model.embed_tokens] if segment.close is None else []
        modules += [model.model.norm] if segment.open is None else []
        return _KeepingLayout(mx.compile(run, inputs=[m.state for m in modules]), modules)

    compiled = [traced(s) for s in segments]

    def step(tokens: mx.array, cache: list[Cache], rope_delta: int | mx.array = 0) -> mx.array:
        B, T = tokens.shape
        if T != 1:
            raise ValueError(f"the decode step takes one token per row, got {T}")
        if any(c.offset == 0 for c in cache):  # an empty cache: the plain call creates its states
            positions = None if _is_zero(rope_delta) else text_position_ids(cache[0].offset, 1, rope_delta, B)
            return model(tokens, cache, position_ids=positions)
        position = (mx.array(cache[0].offset, dtype=mx.int32) + mx.array(rope_delta, dtype=mx.int32)).reshape(-1)
        x: dict = {"tokens": tokens.reshape(B), "position": mx.broadcast_to(position, (B,))}
        # What a trace depends on besides the weights: a new batch size or state dtype traces the segments again.
        shapes = (B, *(str(a.dtype) for a in buffers(cache)))
        for segment, fn in zip(segments, compiled):
            x["states"] = [a for i in segment.linear for a in (cache[i].conv_state, cache[i].recurrent_state)]
            out = fn(x, shapes)
            states = iter(out["states"])
            for i in segment.linear:
                cache[i].conv_state, cache[i].recurrent_state = next(states), next(states)
                cache[i].offset += 1
            if segment.open is None:
                # The lm_head is one matmul, nothing to fuse: uncompiled, it keeps the back end's own form (on the
                # CPU, the stored layout split over two threads).
                return model.logits(out["h"]).reshape(B, 1, -1)
            attn = layers[segment.open].self_attn
            o = attn.attend(out["q"], out["k"], out["v"], cache[segment.open])
            x = {"h": out["h"], "o": o, "gate": out["gate"], "position": x["position"]}
        raise AssertionError("the last segment returns the logits")

    return step


class _KeepingLayout:
    """A compiled segment that keeps `relayout_for_cpu`'s weights usable by the uncompiled path (prefill).

    While tracing, `mx.compile` swaps the input arrays in the module tree for tracers and puts the values back
    afterwards as new array objects; `CPULinear` and `stored_transpose` recognise their weight by object identity,
    so after a trace they would fall back to the checkpoint layout for good. On a call that may trace (new input
    shapes), the relaid-out weights are noted before and put back after: the same values, the same objects.
    """

    def __init__(self, fn: Callable[[dict], dict], modules: list[nn.Module]):
        self.fn, self.modules, self.seen = fn, modules, set()

    def __call__(self, x: dict, shapes: tuple) -> dict:
        if shapes in self.seen:
            return self.fn(x)
        kept = [(m, m.weight) for root in self.modules for _, m in root.named_modules() if "_weight_t" in m.__dict__]
        out = self.fn(x)
        for module, weight in kept:
            module.weight = weight
        self.seen.add(shapes)
        return out


def _is_zero(value: int | mx.array) -> bool:
    return not bool(mx.any(mx.array(value) != 0).item())


def decode_step(model: nn.Module) -> Callable[..., mx.array]:
    """`make_decode_step(model)`, made once per model and kept on it (weights are inputs, so it stays valid)."""
    step = model.__dict__.get("_decode_step")
    if step is None:
        step = make_decode_step(model)
        object.__setattr__(model, "_decode_step", step)
    return step
