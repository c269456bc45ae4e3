"""Self-tests of the CPU emulator for mx.fast.metal_kernel (mlx_qwen36/metal/emulator.py)."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen36.metal.emulator import (
    METAL_ATTRIBUTES,
    EmuKernel,
    KernelCompileError,
    KernelRuntimeError,
    metal_source,
    mlx_generated_source,
)

F32 = mx.float32


def run(kernel_kwargs: dict, call_kwargs: dict) -> list[mx.array]:
    return EmuKernel(**kernel_kwargs)(**call_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The generated text is MLX's, byte for byte
# ---------------------------------------------------------------------------------------------------------------

_ALL_ATTRS_SOURCE = "\n".join(f"(void){a};" for a, _ in METAL_ATTRIBUTES) + "\nout[0] = x[0];"

SIGNATURE_CASES = {
    "plain": (
        dict(name="plain", input_names=["x"], output_names=["out"],
             source="uint i = thread_position_in_grid.x; out[i] = x[i];"),
        dict(inputs=[mx.zeros((16,))], output_shapes=[(16,)], output_dtypes=[F32], grid=(16, 1, 1),
             threadgroup=(16, 1, 1)),
    ),
    "templates_scalars_constant_shape_header": (
        dict(name="myk", input_names=["x", "scale", "n", "flag", "c"], output_names=["out", "out2"],
             header="inline float twice(float v) { return 2.0f * v; }\n",
             source="uint i = thread_position_in_grid.x; out[i] = T(twice(x[i] * scale)) + N + B + c[0] + n + flag;"
                    " out2[i] = x_shape[0] + x_strides[0] + x_ndim + c_shape[0];"),
        dict(inputs=[mx.zeros((4, 16), dtype=mx.float16), 0.5, 3, True, mx.zeros((4,))],
             output_shapes=[(16,), (16,)], output_dtypes=[mx.bfloat16, mx.int32], grid=(16, 1, 1),
             threadgroup=(16, 1, 1), template=[("T", mx.bfloat16), ("N", 7), ("B", False)], init_value=0.0),
    ),
    "template_float_only": (
        dict(name="myk", input_names=["x"], output_names=["out"],
             source="out[thread_position_in_grid.x] = T(x[thread_position_in_grid.x]);"),
        dict(inputs=[mx.zeros((16,))], output_shapes=[(16,)], output_dtypes=[F32], grid=(16, 1, 1),
             threadgroup=(16, 1, 1), template=[("T", mx.float32)]),
    ),
    "all_thread_attributes": (
        dict(name="attrs", input_names=["x"], output_names=["out"], source=_ALL_ATTRS_SOURCE),
        dict(inputs=[mx.zeros((3, 5), dtype=mx.uint32)], output_shapes=[(1,)], output_dtypes=[mx.uint8],
             grid=(1, 1, 1), threadgroup=(1, 1, 1)),
    ),
    "atomic_outputs": (
        dict(name="atom", input_names=["x"], output_names=["acc", "count"], atomic_outputs=True,
             source="atomic_fetch_add_explicit(&acc[0], x[thread_position_in_grid.x], memory_order_relaxed);"),
        dict(inputs=[mx.zeros((64,))], output_shapes=[(1,), (1,)], output_dtypes=[F32, mx.uint32],
             grid=(64, 1, 1), threadgroup=(32, 1, 1), init_value=0),
    ),
    # MLX closes the signature early here (its index counts the shape buffer): reproduced as is.
    "shape_quirk_without_attributes": (
        dict(name="quirk", input_names=["x"], output_names=["a", "b"], source="a[0] = x_shape[0]; b[0] = 1;"),
        dict(inputs=[mx.zeros((9,))], output_shapes=[(1,), (1,)], output_dtypes=[F32, F32], grid=(1, 1, 1),
             threadgroup=(1, 1, 1)),
    ),
}


@pytest.mark.parametrize("case", sorted(SIGNATURE_CASES))
def test_signature_text_is_mlx_text(case):
    kernel_kwargs, call_kwargs = SIGNATURE_CASES[case]
    want = mlx_generated_source(kernel_kwargs, call_kwargs)
    got = metal_source(
        kernel_kwargs["name"],
        kernel_kwargs["input_names"],
        kernel_kwargs["output_names"],
        kernel_kwargs["source"],
        kernel_kwargs.get("header", ""),
        call_kwargs["inputs"],
        call_kwargs["output_dtypes"],
        call_kwargs.get("template"),
        kernel_kwargs.get("atomic_outputs", False),
    )
    assert got == want


def test_signature_details():
    _, call = SIGNATURE_CASES["templates_scalars_constant_shape_header"]
    kk, _ = SIGNATURE_CASES["templates_scalars_constant_shape_header"]
    text = metal_source(kk["name"], kk["input_names"], kk["output_names"], kk["source"], kk["header"],
                        call["inputs"], call["output_dtypes"], call["template"])
    assert "custom_kernel_myk__bfloat16_t_7_0_float16_t_floats_int32_ts_bools_floatc_bfloat16_t_int32_t(" in text
    assert "template <typename T, int N, bool B>\n" in text
    assert "  const constant float& scale [[buffer(4)]],\n" in text
    assert "  const constant float* c [[buffer(7)]],\n" in text
    assert "decltype(custom_kernel_myk__bfloat16_t_7_0_float16_t_floats_int32_ts_bools_floatc_bfloat16_t_int32_t"\
           "<bfloat16_t, 7, 0>)" in text
    kk, call = SIGNATURE_CASES["template_float_only"]
    text = metal_source(kk["name"], kk["input_names"], kk["output_names"], kk["source"], "", call["inputs"],
                        call["output_dtypes"], call["template"])
    assert "custom_kernel_myk__float_float_float(" in text


# ---------------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------------


def test_elementwise_partial_last_threadgroup_and_unwritten_nan():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = 2.0f * x[i] + 1.0f;
        tpt[i] = threads_per_threadgroup.x * 1000 + dispatch_threads_per_threadgroup.x;
        tg[i] = threadgroup_position_in_grid.x * 100 + thread_position_in_threadgroup.x;
    """
    k = EmuKernel("ew", ["x"], ["out", "tpt", "tg"], src)
    x = mx.arange(128, dtype=F32)
    out, tpt, tg = k(inputs=[x], output_shapes=[(128,)] * 3, output_dtypes=[F32, mx.uint32, mx.int32],
                     grid=(100, 1, 1), threadgroup=(32, 1, 1))
    out, tpt, tg = np.array(out), np.array(tpt), np.array(tg)
    np.testing.assert_array_equal(out[:100], 2 * np.arange(100) + 1)
    assert np.isnan(out[100:]).all()  # threads beyond the grid are not launched
    assert (tpt[:96] == 32 * 1000 + 32).all() and (tpt[96:100] == 4 * 1000 + 32).all()  # partial last group
    assert (tpt[100:] == 0xABABABAB).all()  # integer outputs start as a poison pattern
    np.testing.assert_array_equal(tg[:100], (np.arange(100) // 32) * 100 + np.arange(100) % 32)
    # a threadgroup larger than the grid is clamped to it
    out, tpt, _ = k(inputs=[x], output_shapes=[(8,)] * 3, output_dtypes=[F32, mx.uint32, mx.int32],
                    grid=(5, 1, 1), threadgroup=(256, 1, 1))
    np.testing.assert_array_equal(np.array(tpt)[:5], 5 * 1000 + 5)
    assert np.isnan(np.array(out)[5:]).all()


REDUCE_SRC = """
    uint lid = thread_index_in_threadgroup;
    uint n = threads_per_threadgroup.x * threads_per_threadgroup.y;
    uint gid = thread_position_in_grid.y * threads_per_grid.x + thread_position_in_grid.x;
    threadgroup float buf[256];
    buf[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 128; s > 0; s >>= 1) {
        if (lid < s && lid + s < n) {
            buf[lid] += buf[lid + s];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (lid == 0) {
        out[threadgroup_position_in_grid.y * threadgroups_per_grid.x + threadgroup_position_in_grid.x] = buf[0];
    }
"""


def test_threadgroup_memory_reduction_with_barriers():
    k = EmuKernel("tg_reduce", ["x"], ["out"], REDUCE_SRC)
    # 2-D grid (64 x 40) in 16 x 16 threadgroups: 4 x 3 groups, the last row of groups has 8 rows
    x = mx.array(np.random.default_rng(0).integers(-50, 50, size=(40, 64)).astype(np.float32))
    (out,) = k(inputs=[x], output_shapes=[(12,)], output_dtypes=[F32], grid=(64, 40, 1), threadgroup=(16, 16, 1))
    xn = np.array(x)
    want = [xn[by * 16:(by + 1) * 16, bx * 16:(bx + 1) * 16].sum() for by in range(3) for bx in range(4)]
    np.testing.assert_array_equal(np.array(out), np.array(want, dtype=np.float32))
    # speed: 4096 fibers through 9 barriers, compiled already
    xb = mx.ones((16, 256))
    t = time.perf_counter()
    (out,) = k(inputs=[xb], output_shapes=[(16,)], output_dtypes=[F32], grid=(256, 16, 1), threadgroup=(256, 1, 1))
    assert time.perf_counter() - t < 1.0
    np.testing.assert_array_equal(np.array(out), 256)


SIMD_SRC = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    float v = x[i];
    sums[i] = simd_sum(v);
    maxs[i] = simd_max(v);
    mins[i] = simd_min(v);
    float b = v;
    for (ushort off = 1; off < 32; off <<= 1) {
        b += simd_shuffle_xor(b, off);
    }
    fly[i] = b;
    bcast[i] = simd_broadcast(v, 3);
    excl[i] = simd_prefix_exclusive_sum(v);
    incl[i] = simd_prefix_inclusive_sum(v);
    down[i] = simd_shuffle_down(v, 1);
    first[i] = simd_broadcast_first(v + lane);
    votes[i] = uint(static_cast<simd_vote::vote_t>(simd_ballot(v > 0.0f)));
    votes[i] += simd_all(v > -100.0f) ? 1u << 31 : 0u;
    votes[i] += simd_any(v > 1000.0f) ? 1u << 30 : 0u;
    lanes[i] = lane * 100 + simdgroup_index_in_threadgroup * 10 + simdgroups_per_threadgroup;
    quads[i] = quad_sum(v);
    up[i] = simd_shuffle_up(v, 2);
"""
SIMD_OUTS = ["sums", "maxs", "mins", "fly", "bcast", "excl", "incl", "down", "first", "votes", "lanes", "quads", "up"]


def test_simd_collectives_full_and_partial_simdgroup():
    k = EmuKernel("simd_ops", ["x"], SIMD_OUTS, SIMD_SRC)
    rng = np.random.default_rng(1)
    xn = rng.integers(-20, 20, size=80).astype(np.float32)  # exact in float: sums do not depend on the order
    # one threadgroup of 80 threads: SIMD-groups of 32, 32 and a partial one of 16 lanes
    dtypes = [F32] * 9 + [mx.uint32, mx.uint32, F32, F32]
    outs = k(inputs=[mx.array(xn)], output_shapes=[(80,)] * len(SIMD_OUTS), output_dtypes=dtypes,
             grid=(80, 1, 1), threadgroup=(80, 1, 1))
    o = {name: np.array(a) for name, a in zip(SIMD_OUTS, outs)}
    for g0, g1 in ((0, 32), (32, 64), (64, 80)):
        seg = xn[g0:g1]
        np.testing.assert_array_equal(o["sums"][g0:g1], seg.sum())
        np.testing.assert_array_equal(o["maxs"][g0:g1], seg.max())
        np.testing.assert_array_equal(o["mins"][g0:g1], seg.min())
        np.testing.assert_array_equal(o["bcast"][g0:g1], seg[3])
        np.testing.assert_array_equal(o["excl"][g0:g1], np.cumsum(seg) - seg)
        np.testing.assert_array_equal(o["incl"][g0:g1], np.cumsum(seg))
        np.testing.assert_array_equal(o["first"][g0:g1], seg[0])
        ballot = sum(1 << j for j in range(g1 - g0) if seg[j] > 0)
        np.testing.assert_array_equal(o["votes"][g0:g1], ballot + (1 << 31))
        lane = np.arange(g1 - g0)
        np.testing.assert_array_equal(o["lanes"][g0:g1], lane * 100 + (g0 // 32) * 10 + 3)
        np.testing.assert_array_equal(o["quads"][g0:g1], np.repeat(seg.reshape(-1, 4).sum(axis=1), 4))
        np.testing.assert_array_equal(o["up"][g0:g1], np.concatenate([seg[:2], seg[:-2]]))  # lanes 0, 1 unchanged
    for g0 in (0, 32):  # full groups
        np.testing.assert_array_equal(o["fly"][g0:g0 + 32], xn[g0:g0 + 32].sum())
        np.testing.assert_array_equal(o["down"][g0:g0 + 31], xn[g0 + 1:g0 + 32])
        assert o["down"][g0 + 31] == xn[g0 + 31]  # the top lane keeps its own value
    # partial group: the butterfly's xor-16 step and shuffle_down from lane 15 read absent lanes -> NaN
    assert np.isnan(o["fly"][64:80]).all()
    np.testing.assert_array_equal(o["down"][64:79], xn[65:80])
    assert np.isnan(o["down"][79])


def test_divergent_collectives_and_barriers_raise():
    src = """
        uint lane = thread_index_in_simdgroup;
        float v = x[lane];
        if (lane < 16) {
            v = simd_sum(v);
        } else {
            v = simd_max(v);
        }
        out[lane] = v;
    """
    k = EmuKernel("diverge", ["x"], ["out"], src)
    with pytest.raises(KernelRuntimeError, match=r"diverge.*divergent SIMD collective.*lanes 0-15.*simd_sum"):
        k(inputs=[mx.zeros((32,))], output_shapes=[(32,)], output_dtypes=[F32], grid=(32, 1, 1),
          threadgroup=(32, 1, 1))
    src = """
        uint t = thread_index_in_threadgroup;
        if (t < 32) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        } else {
            threadgroup_barrier(mem_flags::mem_device);
        }
        out[t] = x[t];
    """
    k = EmuKernel("split_barrier", ["x"], ["out"], src)
    with pytest.raises(KernelRuntimeError, match=r"split_barrier.*barrier not reached by all threads.*32-63"):
        k(inputs=[mx.zeros((64,))], output_shapes=[(64,)], output_dtypes=[F32], grid=(64, 1, 1),
          threadgroup=(64, 1, 1))


def test_early_return_with_barrier_and_simd_sum():
    src = """
        uint t = thread_index_in_threadgroup;
        if (t >= 40) {
            return;
        }
        threadgroup float buf[64];
        buf[t] = x[t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float s = simd_sum(buf[39 - t]);  // SIMD-group 1 has 8 live lanes
        out[t] = buf[39 - t] + 1000.0f * s;
    """
    k = EmuKernel("early", ["x"], ["out"], src)
    xn = np.arange(64, dtype=np.float32)
    (out,) = k(inputs=[mx.array(xn)], output_shapes=[(64,)], output_dtypes=[F32], grid=(64, 1, 1),
               threadgroup=(64, 1, 1))
    out = np.array(out)
    rev = xn[39::-1]
    want = rev + 1000.0 * np.concatenate([np.full(32, rev[:32].sum()), np.full(8, rev[32:].sum())])
    np.testing.assert_array_equal(out[:40], want)
    assert np.isnan(out[40:]).all()


def test_threadgroup_memory_is_fresh_in_every_threadgroup(monkeypatch):
    monkeypatch.setenv("MLX_QWEN36_EMULATOR_THREADS", "1")  # all threadgroups on one OS thread, one after another
    src = """
        uint t = thread_index_in_threadgroup;
        threadgroup float buf[8], other[2];
        if (threadgroup_position_in_grid.x == 0) {
            buf[t] = float(t);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = buf[t];
    """
    k = EmuKernel("fresh", ["x"], ["out"], src)
    (out,) = k(inputs=[mx.zeros((1,))], output_shapes=[(32,)], output_dtypes=[F32], grid=(32, 1, 1),
               threadgroup=(8, 1, 1))
    out = np.array(out)
    np.testing.assert_array_equal(out[:8], np.arange(8))
    assert np.isnan(out[8:]).all()  # not the first threadgroup's values


HALF_BF16_HEADER = """
template <typename T>
inline float sigmoid(T v) { return 1.0f / (1.0f + metal::exp(-static_cast<float>(v))); }
"""
HALF_BF16_SRC = """
    uint i = thread_position_in_grid.x;
    half h = xh[i];
    oh[i] = h * h + half(1);                                   // half arithmetic
    ob[i] = static_cast<bfloat16_t>(sigmoid(xb[i]) * 3.0f);    // bfloat in, bfloat out
    of[i] = float(xb[i]) + xh[i] + metal::precise::sqrt(fabs(float(xb[i])));
    if (i % 4 == 0) {
        float4 v = float4(xb[i], xb[i + 1], xb[i + 2], xb[i + 3]);
        v = metal::exp(v) * 0.5f;
        o4[i / 4] = static_cast<bfloat16_t>(v.x + v.y + v.z + v.w);
    }
"""


def test_half_and_bfloat_inputs_outputs_with_header_helper():
    k = EmuKernel("lowp", ["xh", "xb"], ["oh", "ob", "of", "o4"], HALF_BF16_SRC, header=HALF_BF16_HEADER)
    rng = np.random.default_rng(2)
    xh = mx.array(rng.normal(size=64).astype(np.float16))
    xb = mx.array(rng.normal(size=64).astype(np.float32)).astype(mx.bfloat16)
    oh, ob, of, o4 = k(inputs=[xh, xb], output_shapes=[(64,), (64,), (64,), (16,)],
                       output_dtypes=[mx.float16, mx.bfloat16, F32, mx.bfloat16], grid=(64, 1, 1),
                       threadgroup=(32, 1, 1))
    assert (oh.dtype, ob.dtype, of.dtype, o4.dtype) == (mx.float16, mx.bfloat16, F32, mx.bfloat16)
    np.testing.assert_array_equal(np.array(oh), np.array(xh * xh + 1))  # half rounding per operation, as MLX's
    xbf = xb.astype(F32)
    want_b = (mx.sigmoid(xbf) * 3.0).astype(mx.bfloat16)
    np.testing.assert_allclose(np.array(ob.astype(F32)), np.array(want_b.astype(F32)), rtol=8e-3)
    want_f = xbf + xh.astype(F32) + mx.sqrt(mx.abs(xbf))
    np.testing.assert_allclose(np.array(of), np.array(want_f), rtol=1e-6)
    want4 = (mx.exp(xbf) * 0.5).reshape(16, 4).sum(axis=1).astype(mx.bfloat16)
    np.testing.assert_allclose(np.array(o4.astype(F32)), np.array(want4.astype(F32)), rtol=8e-3)


SINK_HEADER = """
#include <metal_stdlib>
using namespace metal;
constant constexpr int K = 3;
struct Pair { float a; int b; };
inline Pair make_pair(float a, int b) { return Pair{a, b}; }
"""
SINK_SRC = """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    int k = 0;
    #pragma unroll
    for (int j = 0; j < K; ++j) { k += j; }
    Pair p = make_pair(v, k);
    r[0 * N + i] = metal::exp(v) + metal::fast::exp(v) + metal::precise::exp(v);
    r[1 * N + i] = metal::log(metal::abs(v) + 1.0f) + log2(4.0f) + metal::log1p(metal::fabs(v));
    r[2 * N + i] = metal::pow(metal::abs(v), 1.5f) + metal::sqrt(4.0f) + metal::rsqrt(4.0f) + exp2(1.0f);
    r[3 * N + i] = metal::tanh(v) + metal::sin(v) + metal::cos(v);
    r[4 * N + i] = metal::max(v, 0.0f) + metal::min(v, 0.0f) + fmax(v, 1.0f) + fmin(v, -1.0f);
    r[5 * N + i] = metal::clamp(v, -0.5f, 0.5f) + metal::select(1.0f, 2.0f, v > 0.0f) + metal::fma(v, 2.0f, 1.0f);
    r[6 * N + i] = metal::floor(v) + metal::ceil(v) + metal::round(v);
    r[7 * N + i] = metal::precise::divide(v, 3.0f) + metal::fast::divide(1.0f, 4.0f) + float(p.b);
    r[8 * N + i] = float(metal::isnan(v / 0.0f)) + float(metal::isinf(v / 0.0f)) * 2.0f;
    r[9 * N + i] = Limits<float>::max == metal::numeric_limits<float>::infinity() ? 1.0f : 0.0f;
    r[9 * N + i] += float(Limits<half>::finite_max) + float(Limits<bfloat16_t>::min < 0.0f)
                  + float(Limits<int>::max == 2147483647) + float(Limits<uint8_t>::max);
    r[10 * N + i] = as_type<float>(as_type<uint>(v) ^ 0x80000000u);
    float4 a = float4(v, 1.0f, 2.0f, 3.0f);
    float4 b = a * 2.0f + float4(1.0f);
    b = metal::max(b, float4(0.0f)) - a / 2;
    half4 h = half4(a);
    bfloat4 bf = bfloat4(b);
    uint2 u = uint2(i, 7u);
    int2 s = int2(-1, 2) * int2(u);
    r[11 * N + i] = b.x + b.y + b.z + b[3] + float(h.w) + float(bf.z) + float(s.x + s.y) + dot(a, a);
    ushort us = ushort(i); uchar uc = uchar(255); short sh = -2; ulong ul = 1ul << 40;
    r[12 * N + i] = float(us) + float(uc) + float(sh) + float(ul >> 38);
    float3 f3 = float3(1.0f, 2.0f, 3.0f);
    r[13 * N + i] = float(sizeof(float3)) + float(sizeof(half4)) + float(sizeof(bfloat16_t)) + f3.z;
    r[14 * N + i] = simd_prod(v > 100.0f ? 2.0f : 1.0f) + float(simd_is_first());
    half hh = 1.5h; bfloat16_t bb = bfloat16_t(2.0f);
    r[15 * N + i] = float(hh * hh) + float(bb * bb) + float(bb + 1) + (bb * 1.5f);
"""


def test_msl_math_vectors_limits_and_types():
    k = EmuKernel("sink", ["x"], ["r"], SINK_SRC, header=SINK_HEADER)
    n = 32
    v = np.linspace(-2, 2, n).astype(np.float32)
    (r,) = k(inputs=[mx.array(v)], output_shapes=[(16 * n,)], output_dtypes=[F32], grid=(n, 1, 1),
             threadgroup=(n, 1, 1), template=[("N", n)])
    r = np.array(r).reshape(16, n)
    v64, i = v.astype(np.float64), np.arange(n)
    av = np.abs(v64)
    want = [
        3 * np.exp(v64),
        np.log(av + 1) + 2 + np.log1p(av),
        av**1.5 + 2 + 0.5 + 2,
        np.tanh(v64) + np.sin(v64) + np.cos(v64),
        np.maximum(v64, 0) + np.minimum(v64, 0) + np.maximum(v64, 1) + np.minimum(v64, -1),
        np.clip(v64, -0.5, 0.5) + np.where(v64 > 0, 2, 1) + 2 * v64 + 1,
        np.floor(v64) + np.ceil(v64) + np.sign(v64) * np.floor(av + 0.5),  # round: half away from zero
        v64 / 3 + 0.25 + 3,
        np.full(n, 2.0),  # x / 0 is inf, not NaN (no x is 0)
        np.full(n, 1 + 65504 + 1 + 1 + 255),
        -v64,
        np.maximum(2 * v64 + 1, 0) - v64 / 2 + 2.5 + 4 + 5.5 + 3 + 4 + 14 - i + v64**2 + 14,
        257 + i,
        np.full(n, 16 + 8 + 2 + 3),  # float3 is 16 bytes, as in Metal
        np.where(i == 0, 2, 1),
        np.full(n, 2.25 + 4 + 3 + 3),
    ]
    np.testing.assert_allclose(r, np.array(want), rtol=2e-6, atol=2e-6)


def test_templates_scalar_inputs_and_shape():
    src = """
        uint i = thread_position_in_grid.x;
        uint j = thread_position_in_grid.y;
        if (B) {
            out[j * x_shape[1] + i] = T(x[j * x_shape[1] + i] * scale + N * offset) + x_ndim;
        } else {
            out[j * x_shape[1] + i] = T(-1);
        }
    """
    k = EmuKernel("tmpl", ["x", "scale", "offset"], ["out"], src)
    xn = np.arange(24, dtype=np.float32).reshape(4, 6)
    for dt, b in ((mx.float32, True), (mx.int32, False)):
        (out,) = k(inputs=[mx.array(xn), 0.5, 2], output_shapes=[(4, 6)], output_dtypes=[dt], grid=(6, 4, 1),
                   threadgroup=(8, 8, 1), template=[("T", dt), ("N", 3), ("B", b)])
        assert out.dtype == dt and out.shape == (4, 6)
        want = xn * 0.5 + 3 * 2 + 2 if b else np.full_like(xn, -1)
        np.testing.assert_array_equal(np.array(out.astype(F32)), want)


def test_packed_uint32_read_through_uint8_and_uint16_pointers():
    src = """
        uint i = thread_position_in_grid.x;
        const device uint8_t* w8 = reinterpret_cast<const device uint8_t*>(w);
        const device uint16_t* w16 = (const device uint16_t*)w;
        uint q = (w[i / 8] >> (4 * (i % 8))) & 0xf;
        nib[i] = q;
        bytes[i] = w8[i];
        if (i < 8) halves[i] = w16[i];
    """
    k = EmuKernel("packed", ["w"], ["nib", "bytes", "halves"], src)
    wn = np.random.default_rng(3).integers(0, 2**32, size=4, dtype=np.uint64).astype(np.uint32)
    nib, b8, h16 = k(inputs=[mx.array(wn)], output_shapes=[(32,), (16,), (8,)],
                     output_dtypes=[mx.uint8, mx.uint8, mx.uint16], grid=(16, 1, 1), threadgroup=(16, 1, 1))
    np.testing.assert_array_equal(np.array(b8), wn.view(np.uint8))
    np.testing.assert_array_equal(np.array(h16), wn.view(np.uint16))
    want_nib = np.stack([(wn[:, None] >> (4 * np.arange(8))) & 0xF]).reshape(-1).astype(np.uint8)
    np.testing.assert_array_equal(np.array(nib)[:16], want_nib[:16])
    assert (np.array(nib)[16:] == 0xAB).all()


def test_atomic_outputs_accumulate_with_init_value():
    src = """
        uint i = thread_position_in_grid.x;
        atomic_fetch_add_explicit(&acc[i % 8], x[i], memory_order_relaxed);
        atomic_fetch_add_explicit(&count[0], 1u, memory_order_relaxed);
        atomic_fetch_max_explicit(&count[1], i, memory_order_relaxed);
    """
    k = EmuKernel("atomics", ["x"], ["acc", "count"], src, atomic_outputs=True)
    xn = np.random.default_rng(4).integers(-8, 8, size=4096).astype(np.float32)
    acc, count = k(inputs=[mx.array(xn)], output_shapes=[(8,), (2,)], output_dtypes=[F32, mx.uint32],
                   grid=(4096, 1, 1), threadgroup=(256, 1, 1), init_value=5)
    np.testing.assert_array_equal(np.array(acc), xn.reshape(-1, 8).sum(axis=0) + 5)
    np.testing.assert_array_equal(np.array(count), [4096 + 5, 4095])


def test_row_contiguous_copy_and_real_strides():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = x[elem_to_loc(i, x_shape, x_strides, x_ndim)];
        flat[i] = x[i];
    """
    xt = mx.arange(12, dtype=F32).reshape(3, 4).T  # shape (4, 3), strides (1, 4)
    want = np.arange(12, dtype=np.float32).reshape(3, 4).T.reshape(-1)
    for contiguous in (True, False):
        k = EmuKernel("strided", ["x"], ["out", "flat"], src, ensure_row_contiguous=contiguous)
        out, flat = k(inputs=[xt], output_shapes=[(12,), (12,)], output_dtypes=[F32, F32], grid=(12, 1, 1),
                      threadgroup=(12, 1, 1))
        np.testing.assert_array_equal(np.array(out), want)  # correct either way through the strides
        np.testing.assert_array_equal(np.array(flat), want if contiguous else np.arange(12))


def test_ucontext_backend_gives_the_same_results(monkeypatch):
    monkeypatch.setenv("MLX_QWEN36_EMULATOR_UCONTEXT", "1")
    k = EmuKernel("tg_reduce", ["x"], ["out"], REDUCE_SRC)
    (out,) = k(inputs=[mx.ones((20, 20))], output_shapes=[(4,)], output_dtypes=[F32], grid=(20, 20, 1),
               threadgroup=(16, 16, 1))
    np.testing.assert_array_equal(np.array(out), [256, 64, 64, 16])


def test_memory_faults_raise_instead_of_crashing():
    src = "uint i = thread_position_in_grid.x; out[i] = x[int64_t(i) + (i == 37 ? int64_t(1) << 42 : 0)];"
    k = EmuKernel("wild", ["x"], ["out"], src)  # thread 37 reads 16 TiB past its input
    with pytest.raises(KernelRuntimeError, match=r"wild.*memory fault.*threadgroup \(2,0,0\), thread 5"):
        k(inputs=[mx.zeros((64,))], output_shapes=[(64,)], output_dtypes=[F32], grid=(64, 1, 1),
          threadgroup=(16, 1, 1))
    src = "uint i = thread_position_in_grid.x; volatile float big[40000]; big[i] = x[i]; out[i] = big[i];"
    k = EmuKernel("deep", ["x"], ["out"], src)  # 160 KB of locals in a 64 KiB fiber stack
    with pytest.raises(KernelRuntimeError, match=r"deep.*fiber stack overflow"):
        k(inputs=[mx.zeros((64,))], output_shapes=[(64,)], output_dtypes=[F32], grid=(64, 1, 1),
          threadgroup=(16, 1, 1))
    (out,) = EmuKernel("wild", ["x"], ["out"], "out[thread_position_in_grid.x] = x[0] + 1;")(
        inputs=[mx.zeros((4,))], output_shapes=[(4,)], output_dtypes=[F32], grid=(4, 1, 1), threadgroup=(4, 1, 1))
    np.testing.assert_array_equal(np.array(out), 1)  # and the process goes on


def test_compile_error_names_the_kernel():
    k = EmuKernel("broken_kernel", ["x"], ["out"], "out[0] = x[0] +* ;")
    with pytest.raises(KernelCompileError, match=r"broken_kernel(.|\n)*error"):
        k(inputs=[mx.zeros((8,))], output_shapes=[(1,)], output_dtypes=[F32], grid=(1, 1, 1),
          threadgroup=(1, 1, 1))


def test_threadgroup_over_1024_threads_raises():
    k = EmuKernel("big", ["x"], ["out"], "out[0] = x[0];")
    with pytest.raises(ValueError, match="1025"):
        k(inputs=[mx.zeros((8,))], output_shapes=[(1,)], output_dtypes=[F32], grid=(2048, 1, 1),
          threadgroup=(1025, 1, 1))
    with pytest.raises(ValueError, match="2048"):  # MLX checks the requested size, before clamping to the grid
        k(inputs=[mx.zeros((8,))], output_shapes=[(1,)], output_dtypes=[F32], grid=(8, 1, 1),
          threadgroup=(32, 32, 2))
