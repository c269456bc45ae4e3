"""The fast paths equal the reference: chunked GDN prefill and the one-token step against the recurrence, the fused
router against softmax-then-renormalise, the CPU weight layout and the two-thread splits against the plain model, and
the compiled decode step against the plain call (logits and every cache array, over KV growth and a restore)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_qwen36.ops.gated_delta as gd
from mlx_qwen36 import load_model
from mlx_qwen36.cache import GDNCache, KVCache, restore, snapshot
from mlx_qwen36.fast import make_decode_step
from mlx_qwen36.gated_delta import GatedDeltaNet
from mlx_qwen36.ops import CPULinear, relayout_for_cpu, router, stored_transpose
from mlx_qwen36.positions import text_position_ids

TOL = 1e-4


def gdn_inputs(B: int, T: int, Hk: int, Hv: int, Dk: int, Dv: int, seed: int = 0, decay: float = 1.0,
               with_state: bool = True):
    """Normalised q (scaled), k [B, T, Hk, Dk], v, log decays g <= 0, β in (0, 1), and a state [B, Hv, Dk, Dv]."""
    mx.random.seed(seed)
    q = gd.l2norm(mx.random.normal((B, T, Hk, Dk))) * Dk**-0.5
    k = gd.l2norm(mx.random.normal((B, T, Hk, Dk)))
    v = mx.random.normal((B, T, Hv, Dv))
    g = -decay * mx.random.uniform(0.0, 1.0, (B, T, Hv))
    beta = mx.sigmoid(mx.random.normal((B, T, Hv)))
    state = mx.random.normal((B, Hv, Dk, Dv)) * 0.5 if with_state else mx.zeros((B, Hv, Dk, Dv))
    return q, k, v, g, beta, state


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a - b).max())


# --- gated delta rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T, chunk", [(37, 16), (100, 64), (64, 64), (5, 64), (129, 32)])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("heads", [(2, 4), (3, 3)])  # (Hk, Hv): grouped and not
def test_chunked_equals_recurrence(T, chunk, with_state, heads):
    Hk, Hv = heads
    q, k, v, g, beta, state = gdn_inputs(2, T, Hk, Hv, 32, 16, seed=T, with_state=with_state)
    groups = Hv // Hk
    q, k = gd.expand_heads(q, groups), gd.expand_heads(k, groups)
    o_ref, s_ref = gd.gated_delta_recurrence(q, k, v, g, beta, state)
    o, s = gd.gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    assert max_diff(o, o_ref) <= TOL
    assert max_diff(s, s_ref) <= TOL


@pytest.mark.parametrize("decay", [1e-3, 30.0])
def test_chunked_is_stable_for_extreme_decays_and_aligned_keys(decay):
    """Near-identical keys with β near 1 make (I + A) badly conditioned; strong decays make the cumulative log decay
    large, where a difference of cumulative sums would lose precision."""
    q, _, v, g, beta, state = gdn_inputs(1, 150, 4, 4, 32, 16, seed=3, decay=decay)
    base = mx.random.normal((1, 1, 4, 32))
    k = gd.l2norm(base + 0.05 * mx.random.normal((1, 150, 4, 32)))
    beta = 0.9 + 0.1 * beta
    o_ref, s_ref = gd.gated_delta_recurrence(q, k, v, g, beta, state)
    o, s = gd.gated_delta_chunked(q, k, v, g, beta, state)
    assert max_diff(o, o_ref) <= TOL and max_diff(s, s_ref) <= TOL


@pytest.mark.parametrize("heads", [(2, 4), (4, 4), (1, 3)])
def test_step_equals_recurrence(heads):
    Hk, Hv = heads
    q, k, v, g, beta, state = gdn_inputs(3, 1, Hk, Hv, 16, 8, seed=Hv)
    groups = Hv // Hk
    o_ref, s_ref = gd.gated_delta_recurrence(gd.expand_heads(q, groups), gd.expand_heads(k, groups), v, g, beta,
                                             state)
    o, s = gd.gated_delta_step(q, k, v, g, beta, state)  # groups internally, as expand_heads
    assert max_diff(o, o_ref) <= 1e-5 and max_diff(s, s_ref) <= 1e-5


def test_mx_fast_gated_delta_update_glue_equals_recurrence():
    """The layout glue around `mx.fast.gated_delta_update` (Metal only in the model); on CPU it runs MLX's ops loop."""
    q, k, v, g, beta, state = gdn_inputs(1, 6, 2, 4, 32, 16, seed=7)
    o_ref, s_ref = gd.gated_delta_recurrence(gd.expand_heads(q, 2), gd.expand_heads(k, 2), v, g, beta, state)
    o, s = gd.gated_delta_metal(q, k, v, g, beta, state)
    assert max_diff(o, o_ref) <= TOL and max_diff(s, s_ref) <= TOL


def test_metal_kernel_is_claimed_only_on_metal():
    q, _, v, *_ = gdn_inputs(1, 2, 16, 32, 128, 128)
    assert gd.metal_kernel_covers(q, v) == (mx.default_device() == mx.gpu and mx.metal.is_available())


def test_unit_lower_inverse():
    a = mx.tril(mx.random.normal((3, 64, 64)) * 0.3, k=-1)
    inv = gd.unit_lower_inverse(a)
    eye = mx.eye(64)
    assert max_diff((eye + a) @ inv, mx.broadcast_to(eye, (3, 64, 64))) <= 1e-4
    assert max_diff(mx.triu(inv, k=1), mx.zeros_like(inv)) == 0.0


def test_segsum():
    g = mx.array([[-1.0, -2.0, -3.0, -4.0]])
    seg = np.array(gd.segsum(g))[0]
    for i in range(4):
        for j in range(4):
            want = -np.inf if j > i else -sum(range(j + 2, i + 2))
            assert seg[i, j] == want


# --- router -------------------------------------------------------------------------------------------------------


def test_router_equals_softmax_topk_renormalise():
    logits = mx.random.normal((20, 64)) * 3
    inds, weights = router(logits, 8)
    probs = np.array(mx.softmax(logits, axis=-1))
    ref_inds = np.argsort(-probs, axis=-1)[:, :8]
    assert (np.sort(np.array(inds), -1) == np.sort(ref_inds, -1)).all()
    picked = np.take_along_axis(probs, np.array(inds), -1)
    assert np.abs(np.array(weights) - picked / picked.sum(-1, keepdims=True)).max() <= 1e-6


def test_bf16_experts_on_the_cpu_cast_only_the_selected_ones():
    """A bf16 expert stack on the CPU (whose gather_mm is fp32 only): decode gathers its 2 x 8 experts, then casts
    them, instead of casting all 128 experts per call; the product is the same."""
    from mlx_qwen36.moe import SwitchGLU, _lhs_indices

    E, H, inter = 128, 512, 256
    experts = SwitchGLU(H, inter, E)
    experts.set_dtype(mx.bfloat16)
    mx.eval(experts.parameters())
    x = mx.random.normal((2, H)).astype(mx.bfloat16)
    inds = mx.array(np.random.default_rng(0).choice(E, (2, 8)).astype(np.uint32))
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    y = experts(x, inds)
    mx.eval(y)
    stack_fp32 = E * 2 * inter * H * 4
    assert mx.get_peak_memory() - base < stack_fp32 / 2  # casting the stack alone would take stack_fp32
    w = experts.gate_up_proj.weight.astype(mx.float32).swapaxes(-1, -2)
    h = mx.gather_mm(x.astype(mx.float32).reshape(2, 1, 1, H), w, lhs_indices=_lhs_indices(2, 1), rhs_indices=inds)
    assert y.dtype == mx.bfloat16 and y.shape == (2, 8, H)
    gate, up = mx.split(h, 2, axis=-1)
    mid = (gate * mx.sigmoid(gate) * up).astype(mx.bfloat16)
    wd = experts.down_proj.weight.astype(mx.float32).swapaxes(-1, -2)
    want = mx.gather_mm(mid.astype(mx.float32), wd, lhs_indices=_lhs_indices(2, 8), rhs_indices=inds)
    assert max_diff(y.astype(mx.float32), want.reshape(2, 8, H)) <= 0.02 * float(mx.abs(want).max())


# --- the model's fast paths against the golden logits ---------------------------------------------------------------


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)))


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_cpu_layout_keeps_parameters_and_logits(tiny, kind):
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["hf"], lazy=True)  # a lazy load skips the relayout load_model does on the CPU
    mx.eval(model.parameters())
    before = {k: np.array(v) for k, v in _flat(model)}
    moved = relayout_for_cpu(model)
    assert moved > 0 and relayout_for_cpu(model) == 0  # idempotent
    after = dict(_flat(model))
    assert before.keys() == after.keys()
    for name, w in after.items():
        assert w.shape == before[name].shape and np.array_equal(np.array(w), before[name]), name
    layer = model.layers[0].linear_attn.in_proj_qkv
    assert isinstance(layer, CPULinear) and stored_transpose(layer).shape == layer.weight.shape[::-1]
    assert np.abs(logits_of(model, g["input_ids"]) - g["logits_fp32"]).max() <= TOL


def test_replaced_weights_are_used_after_relayout(tiny):
    model = load_model(tiny["moe"]["hf"])
    layer = model.lm_head
    assert stored_transpose(layer) is not None  # load_model relays out on the CPU
    layer.weight = mx.zeros_like(layer.weight)  # e.g. load_weights after the relayout
    assert stored_transpose(layer) is None
    assert float(mx.abs(layer(mx.ones((1, layer.weight.shape[1])))).max()) == 0.0


@pytest.mark.parametrize("kind", ["moe", "dense"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_chunked_prefill_in_the_model(tiny, kind, threads, monkeypatch):
    """With every prompt on the chunked GDN path (and the CPU layout, one or two threads), logits stay at the
    reference, and a chunked prefill then decode equals the full forward."""
    monkeypatch.setenv("MLX_QWEN36_CPU_THREADS", threads)
    monkeypatch.setattr(gd, "CHUNK_THRESHOLD", 1)
    monkeypatch.setattr(gd, "CHUNK_SIZE", 4)
    monkeypatch.setattr(gd, "CPU_CHUNK_SIZE", 4)
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["hf"])
    relayout_for_cpu(model)
    assert np.abs(logits_of(model, g["input_ids"]) - g["logits_fp32"]).max() <= TOL
    cache = model.make_cache()
    ids = g["input_ids"]
    first = np.array(model(mx.array(ids[:, :9]), cache))
    rest = [np.array(model(mx.array(ids[:, t : t + 1]), cache)) for t in range(9, ids.shape[1])]
    assert np.abs(np.concatenate([first, *rest], axis=1) - g["logits_fp32"]).max() <= TOL


def test_two_cpu_threads_equal_one(tiny, monkeypatch):
    model = load_model(tiny["moe"]["hf"])
    relayout_for_cpu(model)
    ids = mx.array(np.tile(tiny["moe"]["golden"]["input_ids"], (1, 8)))  # 96 tokens: every split is taken
    monkeypatch.setenv("MLX_QWEN36_CPU_THREADS", "1")
    one = np.array(model(ids))
    monkeypatch.setenv("MLX_QWEN36_CPU_THREADS", "2")
    two = np.array(model(ids))
    assert np.abs(one - two).max() <= 1e-5


# --- compiled decode step -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relayout", [False, True])
@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_decode_step_equals_plain_call(tiny, kind, relayout):
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["hf"])
    if relayout:
        relayout_for_cpu(model)
    step = make_decode_step(model)
    ids = mx.array(g["input_ids"])  # [2, 12]: batch rows decode independently
    plain, fast = model.make_cache(), model.make_cache()
    model.prefill(ids, plain)
    model.prefill(ids, fast)
    token = mx.array(g["input_ids"][:, -1:])
    steps = 270  # past one KV growth (256 rows), so the step is traced again
    for i in range(steps):
        want = model(token, plain)
        got = step(token, fast)
        mx.eval(want, got, [c.state for c in plain], [c.state for c in fast])
        assert got.shape == want.shape
        assert max_diff(got, want) <= 1e-5, f"step {i}"
        token = mx.argmax(want[:, -1], axis=-1)[:, None]
    for a, b in zip(plain, fast):
        assert a.offset == b.offset == 12 + steps
        for x, y in zip(a.state, b.state):
            assert x.shape == y.shape and max_diff(x, y) <= 1e-5


def test_decode_step_after_restore(tiny):
    model = load_model(tiny["moe"]["hf"])
    step = make_decode_step(model)
    cache = model.make_cache()
    model.prefill(mx.array(tiny["moe"]["golden"]["input_ids"][:1]), cache)
    token = mx.array([[7]])
    before = snapshot(cache)
    first = step(token, cache)
    mx.eval(first, [c.state for c in cache])
    step(mx.array([[9]]), cache)
    restore(cache, before)
    again = step(token, cache)
    assert max_diff(first, again) == 0.0
    assert all(c.offset == 13 for c in cache)


def variant(tiny, kind: str, dtype: str):
    """The tiny model in a dtype users run: fp32 (the hf checkpoint), bf16 (the release checkpoint), or the bf16
    model quantized to 4 or 8 bits (embedding and lm_head included, so the embedding weight is uint32)."""
    if dtype == "fp32":
        return load_model(tiny[kind]["hf"])
    model = load_model(tiny[kind]["release"])
    if dtype in ("q4", "q8"):
        nn.quantize(model, group_size=32, bits=int(dtype[1]))
        assert model.model.embed_tokens.weight.dtype == mx.uint32
    return model


DTYPE_TOL = {"fp32": 1e-5, "bf16": 0.1, "q4": 0.1, "q8": 0.1}  # bf16 logits of order 5: a few bf16 ulps


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "q4", "q8"])
@pytest.mark.parametrize("start", ["empty", "filled"])
def test_decode_step_in_every_dtype(tiny, dtype, start):
    """From an empty cache (the first token) and a filled one, the compiled step gives the plain call's logits and
    leaves caches of the activations' dtype (bf16 for bf16 and quantized models; only the GDN state is fp32)."""
    model = variant(tiny, "moe", dtype)
    step = make_decode_step(model)
    ids = mx.array(tiny["moe"]["golden"]["input_ids"][:1])
    plain, fast = model.make_cache(), model.make_cache()
    if start == "filled":
        model.prefill(ids, plain)
        model.prefill(ids, fast)
    token = ids[:, -1:]
    for i in range(3):
        want, got = model(token, plain), step(token, fast)
        mx.eval(want, got, [c.state for c in plain], [c.state for c in fast])
        assert max_diff(got, want) <= DTYPE_TOL[dtype], f"step {i}"
        token = mx.argmax(want[:, -1], axis=-1)[:, None]
    activation = mx.float32 if dtype == "fp32" else mx.bfloat16
    for c in fast:
        kinds = [activation, mx.float32] if isinstance(c, GDNCache) else [activation, activation]
        assert [a.dtype for a in c.state] == kinds


def test_decode_step_uses_weights_replaced_after_it_was_traced(tiny):
    model = load_model(tiny["dense"]["hf"])
    step = make_decode_step(model)
    ids = mx.array(tiny["dense"]["golden"]["input_ids"][:1])

    def both() -> tuple[mx.array, mx.array]:
        plain, fast = model.make_cache(), model.make_cache()
        model.prefill(ids, plain)
        model.prefill(ids, fast)
        return model(ids[:, -1:], plain), step(ids[:, -1:], fast)

    want, got = both()  # traces the step with the loaded weights
    assert max_diff(got, want) <= 1e-5
    mx.random.seed(3)
    new = [(k, v + 0.05 * mx.random.normal(v.shape)) for k, v in _flat(model) if "layers.1." in k or "lm_head" in k]
    model.load_weights(new, strict=False)
    changed, got = both()
    assert max_diff(changed, want) > 0.1  # the new weights matter
    assert max_diff(got, changed) <= 1e-5


def test_cpu_layout_survives_the_compiled_step(tiny):
    """Tracing swaps the weights for tracers and back: the relaid-out weights must still be recognised afterwards,
    or prefill would lose the CPU layout and its second thread after the first decoded token."""
    model = load_model(tiny["moe"]["hf"])
    layers = [model.lm_head, model.layers[0].mlp.experts.gate_up_proj, model.layers[0].linear_attn.conv1d]
    assert all(stored_transpose(m) is not None for m in layers)
    step = make_decode_step(model)
    cache = model.make_cache()
    model.prefill(mx.array(tiny["moe"]["golden"]["input_ids"]), cache)
    for _ in range(2):
        mx.eval(step(mx.array([[5], [6]]), cache))
    assert all(stored_transpose(m) is not None for m in layers)


def test_decode_step_is_not_traced_again_when_the_kv_buffer_grows(tiny, monkeypatch):
    model = load_model(tiny["moe"]["hf"])
    step = make_decode_step(model)
    traces = []
    original = GatedDeltaNet.decode

    def counting(self, x, cache, **kwargs):
        traces.append(1)  # Python runs a layer only while a segment is traced
        return original(self, x, cache, **kwargs)

    monkeypatch.setattr(GatedDeltaNet, "decode", counting)
    cache = model.make_cache()
    model.prefill(mx.array(tiny["moe"]["golden"]["input_ids"][:1]), cache)
    mx.eval(step(mx.array([[5]]), cache))
    traced = len(traces)
    assert traced > 0
    for _ in range(KVCache.step + 4):  # past a KV growth
        mx.eval(step(mx.array([[5]]), cache), [c.state for c in cache])
    assert len(traces) == traced
    assert cache[3].keys.shape[2] == 2 * KVCache.step


def test_decode_step_after_an_image_takes_the_rope_delta(tiny):
    """Text after an image sits at cache offset + rope_delta: the step equals the plain call with explicit
    3-D positions there, per row (two rows with different deltas)."""
    model = load_model(tiny["moe"]["hf"])
    step = make_decode_step(model)
    ids = mx.array(tiny["moe"]["golden"]["input_ids"])
    plain, fast = model.make_cache(), model.make_cache()
    model.prefill(ids, plain)
    model.prefill(ids, fast)
    delta = mx.array([-5, 3], dtype=mx.int32)
    token = ids[:, -1:]
    for _ in range(3):
        want = model(token, plain, position_ids=text_position_ids(plain[0].offset, 1, delta))
        got = step(token, fast, rope_delta=delta)
        mx.eval(want, got, [c.state for c in plain], [c.state for c in fast])
        assert max_diff(got, want) <= 1e-5
        token = mx.argmax(want[:, -1], axis=-1)[:, None]
    no_delta = step(token, model.make_cache())
    assert max_diff(no_delta, model(token, model.make_cache())) <= 1e-5


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())
