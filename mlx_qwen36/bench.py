"""Benchmark mlx_qwen36 (and, with `--compare mlx-lm`, mlx-lm's `qwen3_5_moe` / `qwen3_5` on the same weights in
the same process): prefill tokens/s per prompt length, time to first token, decode tokens/s, peak memory,
dispatches (graph primitives) per decoded token, weight bytes read per decoded token and the fraction of this
machine's measured memory bandwidth that makes.

    python -m mlx_qwen36.bench --synthetic one-block --experts 64 --compare mlx-lm --json results.json
    python -m mlx_qwen36.bench --model path/to/checkpoint --prompt-lengths 128,512
    python -m mlx_qwen36.bench --synthetic tiny --compare mlx-lm --json -   # CI smoke test
    python -m mlx_qwen36.bench --check-kernels   # every Metal kernel against its reference, with timings

A synthetic model has random weights at real layer sizes (`one-block`: hidden 2048, 3 GDN + 1 attention layers, 256
experts top-8, I=512, vocab 248,320; `tiny`: a few kilobytes); any size can be changed with flags. Weights are
float32 by default (mlx-lm's MoE does not run in bf16 on the CPU back end).

Method, the same for both implementations:
- prefill: a fresh cache, the prompt through each library's own prefill (mlx_qwen36: `Model.prefill`, chunks of
  512; mlx-lm: `generate_step`'s chunks of 2048), until the first token is evaluated; tokens/s = length / time,
  and that time is the time to first token;
- decode: greedy tokens after the shortest prompt (mlx_qwen36: the compiled `fast.make_decode_step`; mlx-lm: its
  model call, as `generate_step` makes it), pipelined as both generators run it (the next step queued with
  `mx.async_eval` before the current token is read back) and, for comparison, each step evaluated before the next;
- host time: what building one decode step's graph costs the host (the part the pipeline hides behind the
  device's work);
- dispatches: the primitives in the graph of one decode step (logits and new cache arrays), read from
  `mx.export_to_dot`, that launch work (fused kernels count once; views and reshapes, which only re-describe
  memory, are not counted);
- the Mac's graph of one decode step (`graph`): built as on Metal (the ops' Metal forms, each custom kernel one
  `CustomKernel` node; mlx-lm with its own gated-delta Metal kernel) and read from an `mx.export_function` of the
  plain, uncompiled step (`mlx_qwen36.graph`): its launches and the bytes they move (inputs + outputs of each),
  for mlx_qwen36 with kernels on and off and for mlx-lm. Nothing there runs, so it is the same on any machine;
- mlx-lm runs first on the model's arrays as loaded (no copies: its gate/up weights are views of ours); then
  mlx_qwen36 stores its matmul weights in its CPU layout (`ops.relayout_for_cpu`) and runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import graph, kernel_check, memory, spec_bench, synthetic
from .config import ModelConfig
from .convert.hf import keeps_fp32
from .fast import make_decode_step
from .model import Model
from .ops import kernels, relayout_for_cpu

OURS, PEER = "mlx_qwen36", "mlx_lm"
DEFAULT_LENGTHS = (128, 512, 2048)


# ---------------------------------------------------------------------------------------------------------------
# progress


class Progress:
    """A one-line progress bar on stderr: the step being measured, how many are done, and the time so far."""

    def __init__(self, total: int, enabled: bool = True, width: int = 28):
        self.total, self.done, self.width, self.enabled = total, 0, width, enabled
        self.start = time.perf_counter()

    def show(self, label: str) -> None:
        if not self.enabled:
            return
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:7.1f}s  {label[:60]:<60}")
        sys.stderr.flush()

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------------
# models


def synthetic_model(preset: str, overrides: dict[str, Any], dtype: mx.Dtype, seed: int,
                    mtp: bool = False) -> tuple[Model, dict]:
    """A random-weight model of a `synthetic` preset with `overrides`, built in memory (with `mtp`, its MTP head)."""
    text = synthetic.text_config(preset, **overrides)
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict({"model_type": "qwen3_5_moe" if text.get("num_experts") else "qwen3_5",
                                         "text_config": text}), mtp_layers=1 if mtp else 0)
    if dtype != mx.float32:  # as the loader casts: A_log, dt_bias and zero-centred norms stay fp32
        model.update(tree_unflatten([(k, w if keeps_fp32(k) else w.astype(dtype))
                                     for k, w in tree_flatten(model.parameters())]))
    model.eval()
    for _, w in tree_flatten(model.parameters()):  # one tensor at a time: the peak is the model
        mx.eval(w)
    return model, text


def router_predicate(path: str, module: nn.Module) -> bool | dict:
    """How both models are quantized by `--bits`: the router and shared-expert gates at 8 bits (group 64), as
    mlx-lm's `quant_predicate` and the converter's recipes do, every other matmul at the chosen bits."""
    if path.endswith(("mlp.gate", "shared_expert_gate")):
        return {"group_size": 64, "bits": 8}
    return hasattr(module, "to_quantized")


def quantize(model: nn.Module, bits: int, group_size: int) -> None:
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=router_predicate)
    mx.eval(model.parameters())


def loaded_model(path: str, dtype: mx.Dtype, mtp: bool = False) -> tuple[Model, dict]:
    from .loader import load_model

    model = load_model(path, text_only=True, dtype=dtype, mtp=mtp)
    raw = model.config.raw
    return model, dict(raw.get("text_config", raw))


def mlx_lm_model(ours: Model, text_config: dict) -> nn.Module:
    """mlx-lm's model of the same config holding our arrays (the experts' gate/up halves as views, no copies)."""
    from mlx_lm.models import qwen3_5, qwen3_5_moe

    params = dict(tree_flatten(ours.parameters()))
    if any(k.endswith(".scales") for k in params):
        raise SystemExit("--compare needs an unquantized model (load a bf16/fp32 checkpoint with --dtype float32)")
    moe = bool(text_config.get("num_experts"))
    module = qwen3_5_moe if moe else qwen3_5
    args = module.ModelArgs.from_dict({"model_type": "qwen3_5_moe" if moe else "qwen3_5",
                                       "text_config": dict(text_config)})
    peer = module.Model(args)
    weights = []
    for name, w in params.items():
        if name.startswith(("mtp.", "visual.")):
            continue
        name = "language_model." + name
        if name.endswith(".mlp.experts.gate_up_proj.weight"):
            half = w.shape[1] // 2
            prefix = name[: -len("experts.gate_up_proj.weight")] + "switch_mlp."
            weights += [(prefix + "gate_proj.weight", w[:, :half]), (prefix + "up_proj.weight", w[:, half:])]
        else:
            weights.append((name.replace(".mlp.experts.down_proj.", ".mlp.switch_mlp.down_proj."), w))
    peer.load_weights(weights, strict=True)
    peer.eval()
    mx.eval(peer.parameters())
    return peer


# ---------------------------------------------------------------------------------------------------------------
# measurements


# Primitives that only re-describe an array's memory (shape, strides, offset): they launch no kernel.
VIEWS = frozenset({"Reshape", "Transpose", "Slice", "Broadcast", "ExpandDims", "Squeeze", "Split", "AsStrided",
                   "StopGradient"})


def graph_primitives(*outputs: mx.array) -> list[str]:
    """The primitive of every node in the (unevaluated) graph of `outputs`, fused kernels as one node."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.dot")
        mx.export_to_dot(path, *outputs)
        text = Path(path).read_text()
    return [label.split()[0] for label in re.findall(r'label\s*=\s*"([^"]*)"[^\]]*shape\s*=\s*rectangle', text)]


def count_dispatches(*outputs: mx.array) -> int:
    """Nodes of the graph of `outputs` that launch work on the back end (views and reshapes launch nothing)."""
    return sum(p not in VIEWS for p in graph_primitives(*outputs))


def cache_arrays(cache: list) -> list[mx.array]:
    """The arrays a decode step writes, for either library's cache objects."""
    out: list[mx.array] = []
    for c in cache:
        for name in ("keys", "values", "conv_state", "recurrent_state"):
            a = getattr(c, name, None)
            if isinstance(a, mx.array):
                out.append(a)
        if isinstance(getattr(c, "cache", None), list):
            out += [a for a in c.cache if isinstance(a, mx.array)]
    return out


def weight_bytes_per_token(model: Model) -> int:
    """Bytes of weights one decoded token reads: everything but the routed experts, top-k/E of those, one
    embedding row (the full matrix when it doubles as lm_head); MTP and vision weights are not read."""
    cfg = model.config.text
    total = 0
    for name, w in tree_flatten(model.parameters()):
        if name.startswith(("mtp.", "visual.")):
            continue
        if ".mlp.experts." in name:
            total += w.nbytes * cfg.num_experts_per_tok // cfg.num_experts
        elif name.endswith("embed_tokens.weight") and not cfg.tie_word_embeddings:
            total += w.nbytes // w.shape[0]
        else:
            total += w.nbytes
    return total


def memory_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """This machine's memory bandwidth in GB/s: the best numpy copy of `nbytes`, counting bytes read + written."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = None
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        ram = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        import mlx_lm
        lm_version = mlx_lm.__version__
    except ImportError:
        lm_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "os": platform.platform(),
            "python": platform.python_version(), "mlx": mx.__version__, "mlx_lm": lm_version,
            "device": str(mx.default_device())}


class Runner:
    """One implementation's prefill / decode / dispatch measurements (greedy tokens)."""

    name = ""

    def new_cache(self) -> list:
        raise NotImplementedError

    def prefill(self, ids: mx.array, cache: list) -> mx.array:
        """Prompt [1, T] -> the first generated token [1] (evaluated)."""
        raise NotImplementedError

    def step(self, token: mx.array, cache: list) -> mx.array:
        """One decode step, lazily: token [1] -> logits [1, 1, vocab] with the cache updated."""
        raise NotImplementedError

    def decode(self, token: mx.array, cache: list, n: int, pipelined: bool = True) -> float:
        """Seconds for n greedy decode steps. Pipelined as both libraries' generators run (mlx-lm's
        `generate_step`, our `stream_generate`): the step that feeds a token is queued with `mx.async_eval` before
        the token is read back, so building it overlaps the device's work; otherwise each step is evaluated before
        the next is built."""
        start = time.perf_counter()
        if not pipelined:
            for _ in range(n):
                logits = self.step(token, cache)
                token = mx.argmax(logits[:, -1], axis=-1)
                mx.eval(token, cache_arrays(cache))
            return time.perf_counter() - start
        token = mx.argmax(self.step(token, cache)[:, -1], axis=-1)
        mx.async_eval(token, cache_arrays(cache))
        for _ in range(n - 1):
            following = mx.argmax(self.step(token, cache)[:, -1], axis=-1)
            mx.async_eval(following, cache_arrays(cache))
            token.item()
            token = following
        token.item()
        return time.perf_counter() - start

    def host_seconds(self, token: mx.array, cache: list, n: int) -> float:
        """Mean seconds the host spends building one decode step's graph (the part `mx.async_eval` can hide
        behind the previous step's device work; a Mac's decode is bound by it when it exceeds the device's)."""
        total = 0.0
        for _ in range(n):
            start = time.perf_counter()
            logits = self.step(token, cache)
            total += time.perf_counter() - start
            token = mx.argmax(logits[:, -1], axis=-1)
            mx.eval(token, cache_arrays(cache))
        return total / n

    def dispatches(self, token: mx.array, cache: list) -> int:
        logits = self.step(token, cache)
        n = count_dispatches(logits, *cache_arrays(cache))
        mx.eval(logits, cache_arrays(cache))
        return n

    def mac_graphs(self, ids: mx.array) -> dict[str, dict]:
        """The Mac's graph of one decode step after `ids` (see the module docstring), per variant."""
        raise NotImplementedError

    def traced_step(self, ids: mx.array, *contexts: Any) -> dict[str, Any]:
        """The Mac graph's summary of one plain decode step after prefilling `ids` into a fresh cache (discarded
        afterwards: tracing leaves placeholders in it), traced inside `contexts` (the prefill runs outside them)."""
        cache = self.new_cache()
        token = self.prefill(ids, cache)
        mx.eval(cache_arrays(cache))
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            nodes = graph.trace(lambda t: [self.plain_step(t, cache), *cache_arrays(cache)], token[:, None])
        return graph_summary(nodes)

    def plain_step(self, tokens: mx.array, cache: list) -> mx.array:
        raise NotImplementedError


def graph_summary(nodes: list[graph.Node]) -> dict[str, Any]:
    """Launches, and the bytes they move: what a gather or a cache write touches (`graph.bytes_moved`'s
    touched_only), and for the fused MoE kernels only the routed experts' rows of their expert stacks."""
    moved = graph.bytes_moved([n for n in nodes if not _expert_kernel(n)], touched_only=True)
    return {"dispatches": graph.dispatches(nodes), "bytes": moved + sum(_expert_kernel_bytes(n) for n in nodes
                                                                         if _expert_kernel(n)),
            "by_primitive": graph.by_primitive(nodes)}


def _expert_kernel(node: graph.Node) -> bool:
    return node.primitive == "CustomKernel" and (node.name or "").startswith(("custom_kernel_moe_gate_up",
                                                                             "custom_kernel_moe_down"))


def _expert_kernel_bytes(node: graph.Node) -> int:
    """A fused MoE kernel reads, of each [E, rows, cols] expert stack, the rows of the experts its indices pick."""
    inds = next(shape for shape, dtype in node.inputs if dtype == "uint32" and len(shape) == 2)
    total = 0
    for shape, dtype in node.inputs + node.outputs:
        n = int(np.prod(shape)) * np.dtype(_NUMPY_NAMES.get(dtype, dtype)).itemsize
        if len(shape) == 3 and shape[0] > inds[1]:
            n = n * min(shape[0], int(np.prod(inds))) // shape[0]
        total += n
    return total


_NUMPY_NAMES = {"bfloat16": "float16", "bool": "bool_"}


@contextmanager
def fast_ops_as_launches() -> Iterator[None]:
    """`mx.fast`'s fused ops (and `mx.dequantize`) recorded as one launch each, as on Metal: without Metal, MLX
    records their fallback ops instead. Each becomes a `CustomKernel` node with the op's inputs and outputs (not
    run; see `graph`)."""
    made: dict[str, Any] = {}

    def launch(name: str, inputs: list, shapes: list, dtypes: list) -> list[mx.array]:
        key = f"{name}_{len(inputs)}"
        if key not in made:
            made[key] = mx.fast.metal_kernel(name=f"fast_{name}", input_names=[f"i{k}" for k in range(len(inputs))],
                                             output_names=[f"o{k}" for k in range(len(shapes))], source="")
        return made[key](inputs=inputs, output_shapes=shapes, output_dtypes=dtypes, grid=(1, 1, 1),
                          threadgroup=(1, 1, 1))

    def arrays(*xs: Any) -> list[mx.array]:
        return [x for x in xs if isinstance(x, mx.array)]

    def rms_norm(x, weight, eps, **_):
        return launch("rms_norm", arrays(x, weight), [x.shape], [x.dtype])[0]

    def rope(a, dims, *, traditional, base, scale, offset, freqs=None, **_):
        return launch("rope", arrays(a, offset, freqs), [a.shape], [a.dtype])[0]

    def sdpa(q, k, v, *, scale, mask=None, sinks=None, **_):
        return launch("sdpa", arrays(q, k, v, mask, sinks), [(*q.shape[:-1], v.shape[-1])], [q.dtype])[0]

    def gated_delta_update(q, k, v, gamma, beta, initial_state=None, mask=None, **_):
        B, T, Hv, Dv = v.shape
        return launch("gated_delta_update", arrays(q, k, v, gamma, beta, initial_state, mask),
                      [v.shape, (B, Hv, Dv, q.shape[-1])], [v.dtype, mx.float32])

    def dequantize(w, scales=None, biases=None, group_size=64, bits=4, mode="affine", dtype=None, **_):
        return launch("dequantize", arrays(w, scales, biases), [(*w.shape[:-1], w.shape[-1] * 32 // bits)],
                      [dtype or scales.dtype])[0]

    replaced = {(mx.fast, "rms_norm"): rms_norm, (mx.fast, "rope"): rope,
                (mx.fast, "scaled_dot_product_attention"): sdpa, (mx.fast, "gated_delta_update"): gated_delta_update,
                (mx, "dequantize"): dequantize}
    saved = {key: getattr(*key) for key in replaced}
    try:
        for (module, name), fn in replaced.items():
            setattr(module, name, fn)
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


class Ours(Runner):
    name = OURS

    def __init__(self, model: Model, compiled: bool = True, chunk: int | None = None):
        self.model = model
        self.chunk = chunk
        self._step = make_decode_step(model) if compiled else model

    def new_cache(self) -> list:
        return self.model.make_cache()

    def prefill(self, ids: mx.array, cache: list) -> mx.array:
        kwargs = {} if self.chunk is None else {"chunk_size": self.chunk}
        token = mx.argmax(self.model.prefill(ids, cache, **kwargs), axis=-1)
        mx.eval(token)
        return token

    def step(self, token: mx.array, cache: list) -> mx.array:
        return self._step(token[:, None], cache)

    def plain_step(self, tokens: mx.array, cache: list) -> mx.array:
        return self.model(tokens, cache)

    def mac_graphs(self, ids: mx.array) -> dict[str, dict]:
        out = {}
        for name, on in (("kernels", True), ("pure", False)):
            out[name] = self.traced_step(ids, kernels.recording(on), fast_ops_as_launches())
        return out


class MlxLm(Runner):
    """mlx-lm's model driven as `mlx_lm.generate.generate_step` drives it (prefill chunks of 2048)."""

    name = PEER

    def __init__(self, model: nn.Module, prefill_step_size: int = 2048):
        self.model = model
        self.prefill_step_size = prefill_step_size

    def new_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def prefill(self, ids: mx.array, cache: list) -> mx.array:
        prompt = ids[0]
        while prompt.size > 1:
            n = min(self.prefill_step_size, prompt.size - 1)
            self.model(prompt[:n][None], cache=cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[n:]
            mx.clear_cache()
        token = mx.argmax(self.model(prompt[None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        return token

    def step(self, token: mx.array, cache: list) -> mx.array:
        return self.model(token[None], cache=cache)

    def plain_step(self, tokens: mx.array, cache: list) -> mx.array:
        return self.model(tokens, cache=cache)

    def mac_graphs(self, ids: mx.array) -> dict[str, dict]:
        return {"kernels": self.traced_step(ids, mlx_lm_metal_graph(), fast_ops_as_launches())}


@contextmanager
def mlx_lm_metal_graph() -> Iterator[None]:
    """mlx-lm's decode graph as on a Mac: its gated-delta recurrence as its own Metal kernel (made here as Metal
    would make it, recorded by the export) instead of the ops loop it falls back to without Metal."""
    import mlx_lm.models.gated_delta as gdm
    import mlx_lm.models.qwen3_5 as q35

    names = ("_gated_delta_kernel", "_gated_delta_kernel_masked", "_gated_delta_kernel_vec",
             "_gated_delta_kernel_vec_masked", "_gated_delta_kernel_xtree", "_gated_delta_kernel_packed")
    saved = {n: getattr(gdm, n) for n in names}
    saved_update, available = q35.gated_delta_update, mx.metal.is_available
    try:
        mx.metal.is_available = lambda: True
        gdm._gated_delta_kernel = gdm._make_gated_delta_kernel(has_mask=False, vectorized=False)
        gdm._gated_delta_kernel_masked = gdm._make_gated_delta_kernel(has_mask=True, vectorized=False)
        gdm._gated_delta_kernel_vec = gdm._make_gated_delta_kernel(has_mask=False, vectorized=True)
        gdm._gated_delta_kernel_vec_masked = gdm._make_gated_delta_kernel(has_mask=True, vectorized=True)
        gdm._gated_delta_kernel_xtree = gdm._make_gated_delta_kernel_xtree()
        gdm._gated_delta_kernel_packed = gdm._make_gated_delta_packed_kernel()

        def update(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, **_):
            g, beta = gdm.compute_g(A_log, a, dt_bias), mx.sigmoid(b)
            if state is None:
                state = mx.zeros((q.shape[0], v.shape[-2], v.shape[-1], q.shape[-1]), dtype=mx.float32)
            return gdm.gated_delta_kernel(q, k, v, g, beta, state, mask)

        q35.gated_delta_update = update
        yield
    finally:
        mx.metal.is_available = available
        q35.gated_delta_update = saved_update
        for n, v in saved.items():
            setattr(gdm, n, v)


def measure(runner: Runner, prompts: dict[int, mx.array], decode_tokens: int, progress: Progress) -> dict:
    """Warm up, then prefill each prompt on a fresh cache; decode after the shortest; count one step's graph."""
    out: dict[str, Any] = {"prefill_tokens_per_s": {}, "ttft_s": {}}
    mx.reset_peak_memory()
    warm = runner.new_cache()
    token = runner.prefill(prompts[min(prompts)][:, :24], warm)  # traces, compiles kernels, fills caches
    runner.decode(token, warm, 2)
    del warm
    progress.step(f"{runner.name}: warmed up")
    for length in sorted(prompts):
        cache = runner.new_cache()
        start = time.perf_counter()
        token = runner.prefill(prompts[length], cache)
        seconds = time.perf_counter() - start
        out["prefill_tokens_per_s"][str(length)] = length / seconds
        out["ttft_s"][str(length)] = seconds
        progress.step(f"{runner.name}: prefill {length} ({length / seconds:.1f} tok/s)")
        if length == min(prompts):
            seconds = runner.decode(token, cache, decode_tokens)
            out["decode_tokens_per_s"] = decode_tokens / seconds
            out["decode_sync_tokens_per_s"] = decode_tokens / runner.decode(token, cache, decode_tokens, False)
            out["dispatches_per_token"] = runner.dispatches(token, cache)
            out["host_us_per_token"] = 1e6 * runner.host_seconds(token, cache, max(4, decode_tokens // 2))
            out["mac_graph"] = runner.mac_graphs(prompts[length][:, :24])
            progress.step(f"{runner.name}: decode ({decode_tokens / seconds:.2f} tok/s)")
        del cache
        gc.collect()
        mx.clear_cache()
    out["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    out["load_average_after"] = os.getloadavg()[0]  # other processes on the machine skew the timings
    return out


def first_logits(runner: Runner, ids: mx.array) -> np.ndarray:
    """Logits of a short prompt's last position (the two implementations must agree on the same weights)."""
    cache = runner.new_cache()
    logits = runner.model(ids, cache) if isinstance(runner, Ours) else runner.model(ids, cache=cache)
    return np.array(logits[0, -1].astype(mx.float32))


# ---------------------------------------------------------------------------------------------------------------
# the run


def parse_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, flag in (("num_experts", args.experts), ("vocab_size", args.vocab), ("hidden_size", args.hidden),
                      ("num_hidden_layers", args.layers), ("num_experts_per_tok", args.top_k)):
        if flag is not None:
            out[key] = flag
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(mx, args.dtype)
    compare = args.compare == "mlx-lm"
    lengths = sorted({int(x) for x in args.prompt_lengths.split(",") if x.strip()})
    progress = Progress(total=2 + (len(lengths) + 2) * (2 if compare else 1), enabled=not args.quiet)
    progress.show("building the model")
    if args.model:
        model, text = loaded_model(args.model, dtype, mtp=args.mtp)
        source = {"model": args.model}
    else:
        overrides = parse_overrides(args)
        model, text = synthetic_model(args.synthetic, overrides, dtype, args.seed, mtp=args.mtp)
        source = {"synthetic": args.synthetic, "overrides": overrides}
    progress.step("model ready")
    cfg = model.config.text
    rng = np.random.default_rng(args.seed)
    prompts = {n: mx.array(rng.integers(0, cfg.vocab_size, (1, n)), dtype=mx.int32) for n in lengths}
    check_ids = prompts[lengths[0]][:, :8]

    results: dict[str, Any] = {OURS: {}, PEER: None}
    peer_logits = None
    peer_model = mlx_lm_model(model, text) if compare else None
    if args.bits:
        quantize(model, args.bits, args.group_size)
        if peer_model is not None:
            quantize(peer_model, args.bits, args.group_size)
    if compare:  # first, on the arrays as loaded; then they are relayouted for mlx_qwen36
        peer = MlxLm(peer_model, args.mlx_lm_prefill_step)
        peer_model = None
        peer_logits = first_logits(peer, check_ids)
        results[PEER] = measure(peer, prompts, args.decode_tokens, progress)
        del peer
        gc.collect()
        mx.clear_cache()

    relayouted = 0
    if not args.no_relayout and mx.default_device() == mx.cpu:
        relayouted = relayout_for_cpu(model)
    ours = Ours(model, compiled=not args.no_compile, chunk=args.prefill_chunk)
    our_logits = first_logits(ours, check_ids)
    results[OURS] = measure(ours, prompts, args.decode_tokens, progress)
    mtp = None
    if args.mtp:
        progress.show("measuring MTP speculation")
        mtp = spec_bench.measure_mtp(model, [int(t) for t in prompts[lengths[0]][0].tolist()], args.decode_tokens)
    progress.step("measuring bandwidth")
    bandwidth = memory_bandwidth()
    progress.close()

    per_token = weight_bytes_per_token(model)
    report: dict[str, Any] = {
        "machine": machine(), "source": source, "dtype": args.dtype,
        "config": {k: text.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size", "num_experts",
                                            "num_experts_per_tok", "moe_intermediate_size", "linear_num_key_heads",
                                            "linear_num_value_heads", "num_attention_heads", "num_key_value_heads")},
        "settings": {"prompt_lengths": lengths, "decode_tokens": args.decode_tokens,
                     "quantized": {"bits": args.bits, "group_size": args.group_size} if args.bits else None,
                     "relayout_for_cpu_bytes": relayouted, "compiled_decode": not args.no_compile,
                     "prefill_chunk": args.prefill_chunk or "Model.prefill default (512)",
                     "mlx_lm_prefill_step": args.mlx_lm_prefill_step if compare else None},
        "memory_bandwidth_gbs": bandwidth,
        "weight_bytes_per_token": per_token,
        "mtp": mtp,
    }
    for key in ("dispatches_per_token", "host_us_per_token", "prefill_tokens_per_s", "decode_tokens_per_s",
                "decode_sync_tokens_per_s", "ttft_s", "peak_memory_gb"):
        report[key] = {name: (results[name] or {}).get(key) if results[name] else None for name in (OURS, PEER)}
    report["load_average_after"] = {name: (results[name] or {}).get("load_average_after") for name in (OURS, PEER)}
    report["mac_graph"] = {name: (results[name] or {}).get("mac_graph") for name in (OURS, PEER)}
    report["bandwidth_fraction"] = {
        name: per_token * report["decode_tokens_per_s"][name] / (bandwidth * 1e9)
        if report["decode_tokens_per_s"][name] else None for name in (OURS, PEER)}
    if compare:
        report["max_abs_logit_diff"] = float(np.abs(our_logits - peer_logits).max())
        report["ratios"] = ratios(report)
    return report


def ratios(report: dict) -> dict[str, Any]:
    """mlx_qwen36 over mlx-lm (dispatches: mlx_qwen36's count as a fraction of mlx-lm's, lower is better)."""
    def over(key: str) -> float:
        return report[key][OURS] / report[key][PEER]

    mac = report["mac_graph"]
    return {"dispatches_per_token": over("dispatches_per_token"), "decode_tokens_per_s": over("decode_tokens_per_s"),
            "mac_dispatches": {v: mac[OURS][v]["dispatches"] / mac[PEER]["kernels"]["dispatches"] for v in mac[OURS]},
            "mac_bytes": {v: mac[OURS][v]["bytes"] / mac[PEER]["kernels"]["bytes"] for v in mac[OURS]},
            "prefill_tokens_per_s": {n: report["prefill_tokens_per_s"][OURS][n] / v
                                     for n, v in report["prefill_tokens_per_s"][PEER].items()}}


# ---------------------------------------------------------------------------------------------------------------
# output


def markdown(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    peer = report["decode_tokens_per_s"][PEER] is not None
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; MLX {m['mlx']} "
        f"({m['device']}), mlx-lm {m['mlx_lm']}; measured memory bandwidth {report['memory_bandwidth_gbs']:.1f} GB/s.",
        f"Model: {report['source']}, {report['dtype']} weights; hidden {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}, "
        f"{cfg['num_experts'] or 'no'} experts (top-{cfg['num_experts_per_tok'] or '-'}).",
        "",
        "| Measure | mlx_qwen36 | mlx-lm | ratio |" if peer else "| Measure | mlx_qwen36 |",
        "|---|---:|---:|---:|" if peer else "|---|---:|",
    ]

    def row(label: str, key: str, fmt: str, sub: str | None = None, better_low: bool = False) -> None:
        ours = report[key][OURS] if sub is None else report[key][OURS][sub]
        if not peer:
            lines.append(f"| {label} | {fmt.format(ours)} |")
            return
        theirs = report[key][PEER] if sub is None else report[key][PEER][sub]
        ratio = ours / theirs
        lines.append(f"| {label} | {fmt.format(ours)} | {fmt.format(theirs)} | {ratio:.2f}x"
                     f"{' (lower is better)' if better_low else ''} |")

    for n in report["prefill_tokens_per_s"][OURS]:
        row(f"prefill {n} tokens (tok/s)", "prefill_tokens_per_s", "{:.2f}", n)
    for n in report["ttft_s"][OURS]:
        row(f"time to first token, {n}-token prompt (s)", "ttft_s", "{:.2f}", n, better_low=True)
    row("decode, pipelined as the generators run it (tok/s)", "decode_tokens_per_s", "{:.3f}")
    row("decode, each step evaluated before the next (tok/s)", "decode_sync_tokens_per_s", "{:.3f}")
    row("dispatches per decoded token", "dispatches_per_token", "{:d}", better_low=True)
    row("host time building one decode step (µs)", "host_us_per_token", "{:.0f}", better_low=True)
    row("peak memory (GB)", "peak_memory_gb", "{:.3g}", better_low=True)
    row("fraction of memory bandwidth while decoding", "bandwidth_fraction", "{:.1%}")
    mac = report["mac_graph"]
    for variant, label in (("kernels", "custom kernels on"), ("pure", "custom kernels off")):
        ours = mac[OURS][variant]
        theirs = mac[PEER]["kernels"] if peer else None
        for key, name, scale, fmt in (("dispatches", "launches", 1, "{:.0f}"), ("bytes", "MB moved", 1e6, "{:.2f}")):
            cells = [fmt.format(ours[key] / scale)]
            if theirs:
                cells += [fmt.format(theirs[key] / scale), f"{ours[key] / theirs[key]:.2f}x (lower is better)"]
            lines.append(f"| Mac graph of one decode step, {label}: {name} | " + " | ".join(cells) + " |")
    lines.append(f"| weight bytes read per decoded token | {report['weight_bytes_per_token'] / 1e6:.1f} MB |"
                 + (" same | |" if peer else ""))
    if "max_abs_logit_diff" in report:
        diff = report["max_abs_logit_diff"]
        lines += ["", f"Max |logit difference| between the two on the same weights: {diff:.2e}."]
    table = "\n".join(lines) + "\n"
    return table + spec_bench.markdown(report["mtp"]) if report.get("mtp") else table


def nice_step(top: float, ticks: int = 5) -> float:
    """A round tick spacing (1, 2 or 5 times a power of ten) giving about `ticks` ticks up to `top`."""
    raw = top / ticks
    power = 10 ** np.floor(np.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def plot(report: dict, path: str | Path, title: str | None = None) -> None:
    """A PNG of prefill tokens/s against prompt length (log2 axis) for each implementation."""
    series = {label: {int(n): v for n, v in (report["prefill_tokens_per_s"][name] or {}).items()}
              for name, label in ((OURS, "mlx_qwen36"), (PEER, "mlx-lm")) if report["prefill_tokens_per_s"][name]}
    cfg = report["config"]
    title = title or (f"Prefill tokens/s, {report['dtype']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} "
                      f"layers, {cfg['num_experts'] or 'no'} experts - {report['machine']['cpu']}, "
                      f"{report['machine']['cores']} cores")
    plot_series(series, path, title, "prompt length (tokens, log scale)")


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def plot_series(series: dict[str, dict[int, float]], path: str | Path, title: str, xlabel: str,
                ylabel: str = "tok/s") -> None:
    """A PNG of each labelled series {x: tok/s} against x on a log2 axis, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right, top, bottom = 900, 560, 90, 30, 70, 80
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=16)
    small = ImageFont.load_default(size=13)
    xs = sorted({n for s in series.values() for n in s})
    top_value = max(v for s in series.values() for v in s.values()) * 1.1
    step = nice_step(top_value)
    ymax = step * np.ceil(top_value / step)
    lx = [np.log2(n) for n in xs]
    x0, x1 = (min(lx) - 0.3, max(lx) + 0.3) if len(lx) > 1 else (lx[0] - 1, lx[0] + 1)

    def px(n: int, v: float) -> tuple[float, float]:
        return (left + (np.log2(n) - x0) / (x1 - x0) * (W - left - right), H - bottom - v / ymax * (H - top - bottom))

    for v in np.arange(0, ymax + step / 2, step):
        y = px(xs[0], v)[1]
        draw.line([left, y, W - right, y], fill=(225, 225, 225))
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((left - 10, y), f"{v:g}", fill="black", font=small, anchor="rm")
    for n in xs:
        x = px(n, 0)[0]
        draw.line([x, H - bottom, x, H - bottom + 5], fill="black")
        draw.text((x, H - bottom + 10), f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n), fill="black",
                  font=small, anchor="mt")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for colour, s in zip(COLOURS, series.values()):
        pts = [px(n, s[n]) for n in sorted(s)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        for n, (x, y) in zip(sorted(s), pts):
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
            draw.text((x, y - 10), f"{s[n]:.4g}", fill=colour, font=small, anchor="mb")
    for i, (colour, label) in enumerate(zip(COLOURS, series)):
        y = top + 18 + 22 * i
        draw.line([left + 15, y, left + 45, y], fill=colour, width=3)
        draw.text((left + 52, y), label, fill="black", font=font, anchor="lm")
    draw.text((W / 2, 30), title, fill="black", font=font, anchor="mm")
    draw.text((W / 2, H - 30), xlabel, fill="black", font=font, anchor="mm")
    draw.text((18, (top + H - bottom) / 2), ylabel, fill="black", font=font, anchor="lm")
    img.save(path)


def print_plan(args: argparse.Namespace) -> int:
    """`--plan`: the memory plan as a table (and JSON with --json); exit status 1 when it does not fit."""
    from .loader import resolve_model_path

    if not args.model:
        print("error: --plan needs --model", file=sys.stderr)
        return 2
    try:
        p = memory.plan(resolve_model_path(args.model), args.context, args.kv_bits, args.kv_group_size,
                        mtp=args.mtp, vision=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Memory plan of {args.model}:\n")
    print(p.table())
    if args.json:
        data = dict(vars(p), kv=p.kv, total=p.total, fits=p.fits, max_context=p.max_context)
        text = json.dumps(data, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
    return 0 if p.fits else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen36.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint folder or Hub repo id")
    src.add_argument("--synthetic", choices=sorted(synthetic.PRESETS), default="one-block",
                     help="random weights at a preset's sizes (default: one-block)")
    p.add_argument("--experts", type=int, help="number of routed experts (reduce to fit memory; say so)")
    p.add_argument("--top-k", type=int, help="experts per token")
    p.add_argument("--vocab", type=int, help="vocabulary size")
    p.add_argument("--hidden", type=int, help="hidden size")
    p.add_argument("--layers", type=int, help="number of layers (every 4th is full attention)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other text_config field")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--bits", type=int, choices=[4, 8], help="quantize both models (affine; router gates at 8 bits)")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="quantization group size")
    p.add_argument("--prompt-lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--compare", choices=["mlx-lm"], help="also run mlx-lm on the same weights")
    p.add_argument("--mlx-lm-prefill-step", type=int, default=2048, help="mlx-lm's prefill chunk (its default)")
    p.add_argument("--prefill-chunk", type=int, help="mlx_qwen36's prefill chunk (default: Model.prefill's)")
    p.add_argument("--no-relayout", action="store_true", help="keep the checkpoint's [out, in] weight layout")
    p.add_argument("--no-compile", action="store_true", help="decode with the plain model call")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON ('-' for stdout)")
    p.add_argument("--markdown", metavar="PATH", help="also write the markdown table to a file")
    p.add_argument("--plot", metavar="PNG", help="plot prefill tokens/s against prompt length")
    p.add_argument("--mtp", action="store_true",
                   help="also measure MTP speculation: draft and verify costs, break-even acceptance, tokens/s "
                        "plain, at fixed depths and with the adaptive depth (the model gets an MTP head)")
    p.add_argument("--plan", action="store_true",
                   help="only print the memory plan of --model at --context tokens (weights, KV, GDN states, MTP, "
                        "vision) and whether it fits this machine; loads nothing")
    p.add_argument("--context", type=int, default=None, help="the context of --plan (default: the checkpoint's)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="--plan with a quantized KV cache")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--check-kernels", action="store_true",
                   help="only check every custom kernel against its reference (real sizes on a Mac, small ones in "
                        "the emulator elsewhere); bf16, --bits (default 4) and --group-size; fails if any differs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plan:
        sys.exit(print_plan(args))
    if args.check_kernels:
        report = kernel_check.check_all(bits=args.bits or 4, group=args.group_size)
        table = kernel_check.markdown(report)
    else:
        report = run(args)
        table = markdown(report)
    if args.json != "-":
        print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(report, args.plot)
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.check_kernels and not report["ok"]:
        sys.exit("a kernel differs from its reference (or fell back): see the table")


if __name__ == "__main__":
    main()
