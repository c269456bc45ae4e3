"""A compiled decode step: one decoded token as a chain of `mx.compile`d graphs.

`make_decode_step(model)`: elementwise chains fused and host work paid once per trace, kept 2-D from the embedding
to the logits. The KV caches are written at a traced offset, so the trace is reused until a KV buffer grows (every
`KVCache.step` tokens); the caches end up exactly as the plain `model(tokens, cache)` call leaves them. The CPU
back end's weight layout and threads live behind the op layer (`ops.cpu`); this file only keeps that layout usable
across a trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache, buffers
from .ops import kernels
from .positions import no_delta, text_position_ids

__all__ = ["decode_step", "make_decode_step"]


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

    record_steps = False

    def __init__(self, conv_state: mx.array, recurrent_state: mx.array):
        self.conv_state, self.recurrent_state, self.offset = conv_state, recurrent_state, 0


def make_decode_step(model: nn.Module) -> Callable[..., mx.array]:
    """`step(tokens [B, 1], cache, rope_delta=0) -> logits [B, 1, vocab]`, equal to `model(tokens, cache)` and
    updating `cache` the same way (lazily: evaluate the logits and `[c.state for c in cache]` as for the plain call).
    `step.hidden(...)` is the same step up to the final norm: the hidden state [B, 1, H].

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
                h = layer.self_attn.decode_out(x["o"], x["gate"], residual=h)
                h = layer.mlp(layer.post_attention_layernorm(h), residual=h)
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

    def hidden(tokens: mx.array, cache: list[Cache], rope_delta: int | mx.array = 0) -> mx.array:
        """The final-normed hidden state [B, 1, H] of the step (what the lm_head, and the MTP head, read)."""
        B, T = tokens.shape
        if T != 1:
            raise ValueError(f"the decode step takes one token per row, got {T}")
        # An empty cache: the plain call creates its states. Kernels in the CPU emulator run eagerly: not traceable.
        if any(c.offset == 0 for c in cache) or kernels.emulated():
            positions = None if no_delta(rope_delta) else text_position_ids(cache[0].offset, 1, rope_delta, B)
            return model.model(tokens, cache, positions)
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
                return out["h"].reshape(B, 1, -1)
            attn = layers[segment.open].self_attn
            o = attn.attend(out["q"], out["k"], out["v"], cache[segment.open])
            x = {"h": out["h"], "o": o, "gate": out["gate"], "position": x["position"]}
        raise AssertionError("the last segment returns the hidden state")

    def step(tokens: mx.array, cache: list[Cache], rope_delta: int | mx.array = 0) -> mx.array:
        # The lm_head is one matmul, nothing to fuse: uncompiled, it keeps the back end's own form (on the CPU, the
        # stored layout split over two threads).
        return model.logits(hidden(tokens, cache, rope_delta))

    step.hidden = hidden
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


def decode_step(model: nn.Module) -> Callable[..., mx.array]:
    """`make_decode_step(model)`, made once per model and kept on it (weights are inputs, so it stays valid)."""
    step = model.__dict__.get("_decode_step")
    if step is None:
        step = make_decode_step(model)
        object.__setattr__(model, "_decode_step", step)
    return step
