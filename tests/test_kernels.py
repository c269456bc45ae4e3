"""The custom Metal kernels, run from their exact sources in the CPU emulator, against their pure-MLX references.

Every kernel is checked on small shapes that reach its edge cases (T not a multiple of anything, batch > 1, masked
steps, per-step states, bf16/fp16, 4- and 8-bit weights with every group size, experts no token picks), then the
whole model with kernels on and off, the fallbacks (disabled, failing, slower than the reference), the generated
Metal text against MLX's own, and a mutation check: a kernel with one index broken must fail these comparisons.
"""

from __future__ import annotations

import re
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_qwen36 import load_model
from mlx_qwen36.ops import GDNDims, gated_delta_mixer, kernels, router, sparse_moe
from mlx_qwen36.ops import gated_delta as gd
from mlx_qwen36.ops import moe as moe_ops
from mlx_qwen36.ops.linear import MAX_ROWS, QMV, projections

TOL = {mx.float32: 2e-5, mx.bfloat16: 3e-2, mx.float16: 4e-3}


@pytest.fixture
def launches(monkeypatch):
    """Kernels forced on (the emulator here); a fallback is an error; returns the names of the kernels launched."""
    monkeypatch.setenv(kernels.MODE_ENV, "1")
    kernels.reset()
    seen: list[str] = []
    real = kernels.Kernel.__call__

    def counting(self, *args, **kwargs):
        seen.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kernels.Kernel, "__call__", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield seen
    kernels.reset()


def off(fn, *args, **kwargs):
    """fn with every custom kernel off: the reference."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kernels.MODE_ENV, "0")
        out = fn(*args, **kwargs)
        mx.eval(out)
        return out


def err(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


def scale(a: mx.array) -> float:
    return max(1.0, float(mx.abs(a.astype(mx.float32)).max()))


# --- the Gated DeltaNet mixer -------------------------------------------------------------------------------------


def gdn_case(B: int, T: int, dtype: mx.Dtype, Hk: int = 2, Hv: int = 4, Dk: int = 32, Dv: int = 8, K: int = 4,
             seed: int = 0, fresh: bool = False, masked: bool = False) -> tuple[GDNDims, tuple, dict]:
    mx.random.seed(seed)
    dims = GDNDims(Hk, Dk, Hv, Dv, K, 1e-6)
    C = dims.conv_dim
    r = mx.random.normal
    args = (r((B, T, C)).astype(dtype), r((B, T, Hv)).astype(dtype), r((B, T, Hv)).astype(dtype),
            r((B, T, Hv * Dv)).astype(dtype), (r((C, K, 1)) * 0.5).astype(dtype), r((Hv,)) * 0.5,
            mx.random.uniform(0.5, 1.5, (Hv,)), mx.random.uniform(0.5, 1.5, (Dv,)))
    states = {"conv_state": None if fresh else r((B, K - 1, C)).astype(dtype),
              "state": None if fresh else r((B, Hv, Dv, Dk)) * 0.3}
    if masked:  # left padding of different lengths, and a hole
        m = np.ones((B, T), dtype=bool)
        m[0, :2] = False
        m[-1, T // 2] = False
        states["mask"] = mx.array(m)
    return dims, args, states


def check_gdn(dims, args, states, step_states=False):
    want = off(gated_delta_mixer, dims, *args, **states, step_states=step_states)
    got = gated_delta_mixer(dims, *args, **states, step_states=step_states)
    mx.eval(got)
    tol = TOL[args[0].dtype]
    assert err(got.y, want.y) <= tol * scale(want.y), "y"
    assert err(got.conv_state, want.conv_state) == 0.0, "conv state"
    assert got.state.dtype == mx.float32 and err(got.state, want.state) <= tol * scale(want.state), "state"
    if step_states:
        assert err(got.state_steps, want.state_steps) <= tol * scale(want.state_steps), "per-step states"
        assert err(got.conv_steps, want.conv_steps) == 0.0
        assert err(got.state_steps[:, -1], got.state) == 0.0
    return got, want


@pytest.mark.parametrize("B, T", [(1, 1), (2, 1), (1, 5), (2, 7), (1, 2)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_gdn_kernel_equals_reference(launches, B, T, dtype):
    check_gdn(*gdn_case(B, T, dtype))
    assert launches == ["gdn_mixer"]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gdn_kernel_masked_steps(launches, dtype):
    dims, args, states = gdn_case(3, 6, dtype, masked=True)
    got, _ = check_gdn(dims, args, states)
    assert float(mx.abs(got.y[0, :2]).max()) == 0.0  # padding outputs zeros


@pytest.mark.parametrize("T", [1, 4])
def test_gdn_kernel_per_step_states(launches, T):
    check_gdn(*gdn_case(2, T, mx.float32), step_states=True)


def test_gdn_kernel_from_empty_states_and_other_head_layouts(launches):
    check_gdn(*gdn_case(1, 3, mx.float32, fresh=True))
    check_gdn(*gdn_case(2, 3, mx.float32, Hk=1, Hv=3, Dk=64, Dv=12, K=3))  # 3 value heads per key head, odd K
    check_gdn(*gdn_case(1, 2, mx.float32, Hk=2, Hv=2, Dk=32, Dv=128))  # the real Dv: 32 SIMD-groups of 4 columns


def test_gdn_prefill_in_the_kernel_equals_the_chunked_reference(launches, monkeypatch):
    """A prompt long enough for the reference's chunk-parallel form (T not a multiple of the chunk)."""
    monkeypatch.setattr(gd, "CPU_CHUNK_SIZE", 8)
    check_gdn(*gdn_case(1, 37, mx.float32))


def test_gdn_shapes_the_kernel_does_not_cover_take_the_reference(launches):
    dims, args, states = gdn_case(1, 2, mx.float32, Dk=16)
    check_gdn(dims, args, states)
    assert launches == []


def delta_rule_case(B, T, Hk=2, Hv=4, Dk=32, Dv=16, seed=0):
    """Normalised q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], log decays and write strengths, a state [B, Hv, Dk, Dv]."""
    mx.random.seed(seed)
    q, k = (gd.l2norm(mx.random.normal((B, T, Hk, Dk))) for _ in range(2))
    v = mx.random.normal((B, T, Hv, Dv))
    g = -mx.random.uniform(0.01, 0.5, (B, T, Hv))
    beta = mx.random.uniform(0.1, 0.9, (B, T, Hv))
    state = mx.random.normal((B, Hv, Dk, Dv)) * 0.3
    return q * Dk**-0.5, k, v, g, beta, state


@pytest.mark.parametrize("B, T, Dv", [(1, 17, 16), (2, 150, 16), (1, 64, 128), (1, 200, 8)])
def test_chunk_scan_kernel_equals_the_recurrence(launches, B, T, Dv):
    """The chunk-parallel prefill with its sequential part in one launch: one chunk (padded), several chunks with a
    padded last one, the real value width, grouped heads; against the token-by-token recurrence."""
    q, k, v, g, beta, state = delta_rule_case(B, T, Dv=Dv)
    o, s = gd.delta_rule(q, k, v, g, beta, state)
    G = v.shape[2] // q.shape[2]
    want_o, want_s = gd.gated_delta_recurrence(gd.expand_heads(q, G), gd.expand_heads(k, G), v, g, beta, state)
    mx.eval(o, s)
    assert launches == ["gdn_chunk_scan"]
    assert err(o, want_o) <= 1e-4 * scale(want_o) and err(s, want_s) <= 1e-4 * scale(want_s)


def test_chunk_scan_kernel_equals_its_ops_form(launches):
    q, k, v, g, beta, state = delta_rule_case(2, 130, Hk=4, Hv=4, Dk=64, Dv=32, seed=3)
    scanned = gd.gated_delta_chunked(q, k, v, g, beta, state, chunk_size=64, scan=gd.chunk_scan_kernel)
    looped = gd.gated_delta_chunked(q, k, v, g, beta, state, chunk_size=64)
    for a, b in zip(scanned, looped):
        assert a.shape == b.shape and err(a, b) <= 1e-5 * scale(b)


# --- projections (qmv) ---------------------------------------------------------------------------------------------


def quantized_layers(dtype, outs, H=128, bits=4, group=64, seed=0):
    mx.random.seed(seed)
    layers = [nn.Linear(H, o, bias=False) for o in outs]
    for layer in layers:
        layer.set_dtype(dtype)
    layers = [layer.to_quantized(group_size=group, bits=bits) for layer in layers]
    mx.eval([layer.parameters() for layer in layers])
    return layers


def check_projections(layers, rows, dtype, gate=False, residual=False, seed=1):
    mx.random.seed(seed)
    H = layers[0].scales.shape[1] * layers[0].group_size
    x = mx.random.normal((rows, H)).astype(dtype)
    g = mx.random.normal((rows, H)).astype(dtype) if gate else None
    r = mx.random.normal((rows, layers[0].scales.shape[0])).astype(dtype) if residual else None
    want = off(projections, x, layers, gate=g, residual=r)
    got = projections(x, layers, gate=g, residual=r)
    mx.eval(got)
    assert [a.shape for a in got] == [a.shape for a in want]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert err(a, b) <= 2 * TOL[dtype] * scale(b), (err(a, b), scale(b))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_qmv_equals_reference_for_every_quantization(launches, bits, group):
    check_projections(quantized_layers(mx.bfloat16, [24, 8, 4, 4], bits=bits, group=group), 3, mx.bfloat16)
    assert launches == ["qmv"]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_qmv_output_gate_and_residual(launches, dtype):
    """Attention's o_proj: x * sigmoid(gate) in, the skip connection added to the output."""
    check_projections(quantized_layers(dtype, [40]), 2, dtype, gate=True, residual=True)
    check_projections(quantized_layers(dtype, [40, 8]), 1, dtype, gate=True)
    assert launches == ["qmv", "qmv"]


def test_qmv_covers_few_rows_of_one_quantization_only(launches):
    """Many rows (prefill), mixed quantizations, unquantized layers: each layer's own matmul."""
    check_projections(quantized_layers(mx.float32, [16, 8]), MAX_ROWS + 1, mx.float32)
    mixed = quantized_layers(mx.float32, [16], bits=4) + quantized_layers(mx.float32, [8], bits=8)
    check_projections(mixed, 2, mx.float32)
    assert launches == []
    with pytest.raises(ValueError, match="one projection"):
        projections(mx.zeros((1, 128)), quantized_layers(mx.float32, [8, 8]), residual=mx.zeros((1, 8)))


# --- the MoE block ------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """The MoE block's modules (as `SparseMoeBlock`) at test sizes."""

    def __init__(self, H: int, inter: int, shared: int, E: int, k: int):
        super().__init__()
        from mlx_qwen36.moe import MLP, SwitchGLU

        self.top_k, self.hidden = k, H
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = SwitchGLU(H, inter, E)
        self.shared_expert = MLP(H, shared)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def __call__(self, x):
        return sparse_moe(x, self.gate, self.experts, self.shared_expert, self.shared_expert_gate, self.top_k)


def moe_block(dtype, bits=4, group=32, H=128, inter=64, shared=64, E=8, k=2, shared_bits=None, seed=0):
    mx.random.seed(seed)
    block = Block(H, inter, shared, E, k)
    block.set_dtype(dtype)
    nn.quantize(block, group_size=group, bits=bits,
                class_predicate=lambda path, m: hasattr(m, "to_quantized") and "shared_expert." not in path)
    nn.quantize(block.shared_expert, group_size=group, bits=shared_bits or bits)
    mx.eval(block.parameters())
    return block


def check_moe(block, N, dtype, seed=1):
    mx.random.seed(seed)
    x = mx.random.normal((N, block.hidden)).astype(dtype)
    want = off(block, x)
    got = block(x)
    mx.eval(got)
    assert got.dtype == dtype
    assert err(got, want) <= 2 * TOL[dtype] * scale(want), (err(got, want), scale(want))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_moe_kernels_equal_reference_for_every_quantization(launches, bits, group):
    width = max(64, group)  # the down projection's input is quantized in groups too
    check_moe(moe_block(mx.bfloat16, bits, group, inter=width, shared=width), 2, mx.bfloat16)
    assert launches == ["qmv", "moe_router", "moe_gate_up", "moe_down"]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_moe_kernels_in_other_dtypes(launches, dtype):
    check_moe(moe_block(dtype, 4, 64), 3, dtype)


def test_moe_kernels_with_idle_experts_and_one_token(launches):
    """One token, top-2 of 16 experts: 14 experts get nothing."""
    check_moe(moe_block(mx.float32, 4, 32, E=16, k=2), 1, mx.float32)


def test_moe_shared_expert_of_other_bits_runs_beside_the_kernels(launches):
    """The `mixed` recipe: 4-bit experts, an 8-bit shared expert, which then runs as its own ops."""
    block = moe_block(mx.bfloat16, 4, 64, shared_bits=8)
    assert moe_ops.fused_spec(mx.zeros((1, 128), mx.bfloat16), block.experts, block.shared_expert, 2) \
        .shared_intermediate == 0
    check_moe(block, 2, mx.bfloat16)
    assert launches == ["qmv", "moe_router", "moe_gate_up", "moe_down", "qmv", "qmv"]  # then gate/up, down


def test_moe_shared_expert_of_another_width(launches):
    check_moe(moe_block(mx.float32, 8, 32, inter=32, shared=96), 2, mx.float32)


def test_moe_many_tokens_and_unquantized_experts_take_the_reference(launches):
    check_moe(moe_block(mx.float32, 4, 32, k=8, E=8), 8, mx.float32)  # 64 pairs: sorted gathers
    block = Block(64, 32, 32, 8, 2)
    mx.eval(block.parameters())
    check_moe(block, 2, mx.float32)
    assert "moe_router" not in launches and "moe_gate_up" not in launches and "moe_down" not in launches


@pytest.mark.parametrize("E, k", [(8, 1), (40, 8), (256, 8)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_router_kernel_picks_the_top_k(launches, E, k, dtype):
    mx.random.seed(E + k)
    logits = mx.random.normal((3, E)).astype(dtype)
    shared = mx.random.normal((3, 1)).astype(dtype)
    inds, weights = moe_ops.ROUTER(
        inputs=[logits, shared], output_shapes=[(3, k), (3, k + 1)], output_dtypes=[mx.uint32, dtype],
        grid=(32, 3, 1), threadgroup=(32, 1, 1), template=[("T", dtype), ("E", E), ("K", k), ("HAS_SHARED", True)])
    want_inds, want_w = router(logits, k)
    got, want = np.array(inds), np.array(want_inds)
    values = np.array(logits.astype(mx.float32))
    # k distinct experts whose logits are the k largest (bf16 logits tie: either of two equal ones is right)
    assert all(len(set(row)) == k for row in got)
    assert np.array_equal(np.sort(np.take_along_axis(values, got.astype(np.int64), -1)),
                          np.sort(np.take_along_axis(values, want, -1)))
    by_logit = np.take_along_axis(values, got.astype(np.int64), -1)
    mine = np.take_along_axis(np.array(weights[:, :k].astype(mx.float32)), np.argsort(by_logit, axis=-1), -1)
    back = np.take_along_axis(np.array(want_w.astype(mx.float32)),
                              np.argsort(np.take_along_axis(values, want, -1), axis=-1), -1)
    assert np.abs(mine - back).max() <= TOL[dtype]
    assert np.abs(np.array(weights[:, k].astype(mx.float32)) - np.array(mx.sigmoid(shared[:, 0]).astype(mx.float32))
                  ).max() <= TOL[dtype]


# --- the whole model ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_model_dir(tmp_path_factory):
    """A tiny random MoE checkpoint whose GDN heads the kernel covers (Dk = 32), fp32 and a 4-bit conversion."""
    from mlx_qwen36.convert import convert
    from mlx_qwen36.synthetic import text_config, write_checkpoint

    root = tmp_path_factory.mktemp("kernel-model")
    cfg = text_config("tiny", linear_key_head_dim=32, linear_value_head_dim=16, hidden_size=64,
                      moe_intermediate_size=64, shared_expert_intermediate_size=64)
    hf = write_checkpoint(root / "hf", cfg, dtype=mx.float32, weight_scale=0.5)
    convert(hf, root / "q4", quantize=True, bits=4, group_size=32)
    return {"fp32": hf, "q4": root / "q4"}


def model_outputs(model):
    """Logits of a prompt and two decode steps, and the caches after them."""
    ids = mx.array([[3, 17, 101, 250, 9, 44, 7]])
    cache = model.make_cache()
    out = [model(ids, cache)]
    for t in (5, 77):
        out.append(model(mx.array([[t]]), cache))
    mx.eval(out, [c.state for c in cache])
    return out, [a for c in cache for a in c.state]


def as_fp32(model):
    """The model with fp32 activations: every bf16 parameter (norms, embeddings, quantization scales) upcast."""
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.bfloat16 else p, model.parameters()))
    return model


@pytest.mark.parametrize("which", ["fp32", "q4"])
def test_model_agrees_with_kernels_on_and_off(launches, kernel_model_dir, which):
    """In fp32 activations (the 4-bit checkpoint's quantized weights as they are) the two paths agree to rounding."""
    model = as_fp32(load_model(kernel_model_dir[which]))
    want, want_cache = off(model_outputs, model)
    got, got_cache = model_outputs(model)
    for g, w in zip(got + got_cache, want + want_cache):
        assert err(g, w) <= 1e-4 * scale(w)
    assert "gdn_mixer" in launches
    if which == "q4":
        assert {"qmv", "moe_router", "moe_gate_up", "moe_down"} <= set(launches)


def test_bf16_model_with_kernels_is_no_further_from_fp32_than_the_reference(launches, kernel_model_dir):
    """The 4-bit checkpoint as converted (bf16 activations). A random tiny model amplifies rounding, so the two bf16
    paths differ by far more than bf16's epsilon; the kernels, accumulating in fp32, must land at least as close to
    the fp32-activation result as the bf16 reference does."""
    truth, _ = off(model_outputs, as_fp32(load_model(kernel_model_dir["q4"])))
    model = load_model(kernel_model_dir["q4"])
    reference, _ = off(model_outputs, model)
    kernel, _ = model_outputs(model)

    def rel(a, b):
        return float(mx.sqrt(mx.mean((a.astype(mx.float32) - b) ** 2)) / mx.sqrt(mx.mean(b ** 2)))

    for k, r, t in zip(kernel, reference, truth):
        assert k.dtype == mx.bfloat16
        assert rel(k, t) <= 1.25 * rel(r, t) + 1e-2, (rel(k, t), rel(r, t))


# --- switching kernels off, failures, timed choice ---------------------------------------------------------------


def test_kernels_off_runs_no_kernel(monkeypatch):
    monkeypatch.setenv(kernels.MODE_ENV, "0")
    assert kernels.backend() is None
    calls = []
    monkeypatch.setattr(kernels.Kernel, "__call__", lambda self, *a, **k: calls.append(self.name))
    dims, args, states = gdn_case(1, 1, mx.float32)
    mx.eval(gated_delta_mixer(dims, *args, **states))
    assert calls == []


def test_default_is_off_without_metal(monkeypatch):
    monkeypatch.delenv(kernels.MODE_ENV, raising=False)
    assert kernels.mode() == "auto" and kernels.backend() is None  # no Metal here: the references


def test_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv(kernels.MODE_ENV, "yes")
    with pytest.raises(ValueError, match="MLX_QWEN36_KERNELS"):
        kernels.mode()


def test_a_kernel_that_does_not_compile_is_reported_once_and_falls_back(monkeypatch):
    monkeypatch.setenv(kernels.MODE_ENV, "1")
    kernels.reset()
    broken = gd.GDN_KERNEL.spec()
    monkeypatch.setattr(gd.GDN_KERNEL, "spec", lambda: dict(broken, source=broken["source"] + "\nthis is not MSL;"))
    gd.GDN_KERNEL._made.clear()
    dims, args, states = gdn_case(1, 1, mx.float32)
    want = off(gated_delta_mixer, dims, *args, **states)
    with pytest.warns(RuntimeWarning, match="gdn_mixer"):
        got = gated_delta_mixer(dims, *args, **states)
    assert err(got.y, want.y) == 0.0 and kernels.failed("gdn_mixer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gated_delta_mixer(dims, *args, **states)  # reported once
    gd.GDN_KERNEL._made.clear()
    kernels.reset()


def test_on_metal_a_slower_kernel_is_not_used_and_the_choice_is_remembered(monkeypatch, tmp_path):
    """The timed choice, with the machine faked: `auto` on a 'Metal' device where the kernel measures slower."""
    monkeypatch.delenv(kernels.MODE_ENV, raising=False)
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setattr(kernels, "device_name", lambda: "Apple M9")
    monkeypatch.setattr(kernels, "CHOICES_PATH", tmp_path / "choices.json")
    kernels.reset()
    ran = []

    def kernel(x):
        ran.append("kernel")
        return x + 1

    def reference(x):
        ran.append("reference")
        return x + 1

    timings = {kernel: 2.0, reference: 1.0}
    monkeypatch.setattr(kernels, "measure", lambda fn, args: timings[fn])
    x = mx.ones((4,))
    kernels.dispatch("k", (4,), kernel, reference, (x,))
    assert ran[-1] == "reference"
    ran.clear()
    kernels.dispatch("k", (4,), kernel, reference, (x,))
    assert ran == ["reference"]  # decided once: no probe, no timing
    kernels.reset()
    timings.update({kernel: 0.5})
    ran.clear()
    kernels.dispatch("k", (4,), kernel, reference, (x,))
    assert ran == ["kernel", "reference"]  # the probe, then the choice remembered on disk from the first run
    kernels.dispatch("k", (8,), kernel, reference, (mx.ones((8,)),))
    assert ran[-1] == "kernel"  # another shape is timed anew
    kernels.reset()


def test_on_metal_a_kernel_failing_its_probe_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.MODE_ENV, "1")
    monkeypatch.setattr(kernels, "on_metal", lambda: True)
    monkeypatch.setattr(kernels, "CHOICES_PATH", tmp_path / "choices.json")
    kernels.reset()

    def kernel(x):
        raise RuntimeError("[metal::Device] Unable to build metal library from source")

    with pytest.warns(RuntimeWarning, match="`k2` kernel failed"):
        y = kernels.dispatch("k2", (), kernel, lambda x: x * 2, (mx.ones((2,)),))
    assert np.array(y).tolist() == [2.0, 2.0]
    kernels.reset()


# --- the generated Metal text, and a mutation check ---------------------------------------------------------------


def recorded_calls(monkeypatch) -> list:
    calls = []
    real = kernels.Kernel.__call__

    def recording(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
        calls.append((self, dict(inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
                                 threadgroup=threadgroup, template=template)))
        return real(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template)

    monkeypatch.setattr(kernels.Kernel, "__call__", recording)
    return calls


def test_emulated_source_is_the_text_mlx_generates(launches, monkeypatch):
    from mlx_qwen36.metal.emulator import metal_source, mlx_generated_source

    calls = recorded_calls(monkeypatch)
    check_gdn(*gdn_case(2, 3, mx.bfloat16, masked=True), step_states=True)
    check_gdn(*gdn_case(1, 1, mx.float32))  # no mask: its stand-in
    check_moe(moe_block(mx.bfloat16, 4, 64), 2, mx.bfloat16)
    check_moe(moe_block(mx.float32, 4, 64, shared_bits=8), 1, mx.float32)  # the shared expert's stand-ins
    check_projections(quantized_layers(mx.float32, [8]), 1, mx.float32, gate=True, residual=True)
    mx.eval(gd.delta_rule(*delta_rule_case(1, 40)))
    assert {k.name for k, _ in calls} == {"gdn_mixer", "gdn_chunk_scan", "qmv", "moe_router", "moe_gate_up",
                                          "moe_down"}
    for kernel, call in calls:
        spec = kernel.spec()
        mine = metal_source(spec["name"], spec["input_names"], spec["output_names"], spec["source"], spec["header"],
                            call["inputs"], call["output_dtypes"], call["template"])
        assert mine == mlx_generated_source(spec, call), kernel.name
        assert_constant_inputs_only_indexed(kernel.name, mine)


def assert_constant_inputs_only_indexed(name: str, text: str) -> None:
    """Metal keeps address spaces apart: an input MLX passes as `const constant T*` (fewer than 8 elements) cannot
    initialise or be assigned to a variable declared `device`, which the emulator (its address spaces are empty
    macros) would not notice; so it is checked on the text. Pointers are bound with `auto` or passed to the
    header's templates, which take any address space."""
    constant = re.findall(r"const constant \w+\* (\w+) \[\[buffer", text)
    body = re.sub(r"//[^\n]*", "", text[text.index("{"):])
    declared = re.findall(r"device[^;=(){}]*\*\s*(\w+)\s*;", body)  # `const device T* p;`, assigned later
    for param in constant:
        initialised = re.search(rf"device[^;=(){{}}]*\*\s*\w+\s*=[^;]*\b{param}\b", body)
        assigned = [d for d in declared if re.search(rf"\b{d}\s*=[^;]*\b{param}\b", body)]
        assert initialised is None and not assigned, f"{name}: constant-space input {param!r} bound to a device pointer"


@pytest.mark.parametrize("kernel, needle, broken", [
    ("gdn_mixer", "S[j][i] = col[lane + 32 * i];", "S[j][i] = col[(lane + 32 * i + 1) % DK];"),
    ("gdn_mixer", "int cv = 2 * HK * DK + hv * DV + i;\n    float av", "int cv = 2 * HK * DK + hv * DV + i + 1;\n"
                                                                     "    float av"),
    ("moe_gate_up", "size_t rg = e * 2 * I + r, ru = e * 2 * I + I + r;", "size_t rg = e * 2 * I + r, ru = rg;"),
    ("moe_down", "int group = first / GS;", "int group = first / GS + (GS == 32);"),  # in common.h: both matvecs
    ("qmv", "size_t o = r - R0;\n", "size_t o = r - R0 + 1;\n"),
    ("gdn_chunk_scan", "+ sg * CPS + j] - p;", "+ sg * CPS + j];"),  # V' = U, not U - W·S
    ("gdn_chunk_scan", "simd_broadcast(vn[j][m], ushort(l))", "simd_broadcast(vn[j][m], ushort(31 - l))"),
    ("qmv", "float(residual[size_t(n) * R + r])", "float(residual[size_t(n) * R + (r + 1) % R])"),
])
def test_a_broken_index_fails_the_comparison(launches, monkeypatch, kernel, needle, broken):
    real = kernels.source.__wrapped__
    target = next(f for f in (f"{kernel}.metal", "common.h") if needle in real(f))  # the mutation still applies
    monkeypatch.setattr(kernels, "source", lambda f: real(f).replace(needle, broken) if f == target else real(f))
    for k in (gd.GDN_KERNEL, gd.CHUNK_SCAN, moe_ops.ROUTER, moe_ops.GATE_UP, moe_ops.DOWN, QMV):
        monkeypatch.setattr(k, "_made", {})
    with pytest.raises(AssertionError):
        if kernel == "gdn_mixer":
            check_gdn(*gdn_case(1, 3, mx.float32))
        elif kernel == "gdn_chunk_scan":
            test_chunk_scan_kernel_equals_the_recurrence(launches, 1, 70, 16)
        elif kernel == "qmv":
            check_projections(quantized_layers(mx.float32, [16, 8]), 2, mx.float32, residual=False)
            check_projections(quantized_layers(mx.float32, [16]), 2, mx.float32, residual=True)
        else:
            check_moe(moe_block(mx.float32, 4, 32), 2, mx.float32)
