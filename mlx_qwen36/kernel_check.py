"""Every custom kernel against its pure-MLX reference on this machine: `python -m mlx_qwen36.bench --check-kernels`.

Each case runs one op (the GDN mixer, the chunk-parallel delta rule of a prompt, the MoE block, the fused
projections) twice on the same random inputs, kernels
forced off (the reference) and on, and reports the largest difference, the tolerance it must be within, and the
time of each path. On a Mac the cases have the real model's sizes (Qwen3.6-35B-A3B: GDN heads 16/32 x 128, 256
experts of 512, hidden 2048) and the kernels run on the GPU; elsewhere the kernels run in the CPU emulator
(`mlx_qwen36.metal.emulator`) on small sizes of the same shapes, and its times say nothing of a Mac's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .moe import MLP, SwitchGLU
from .ops import GDNDims, gated_delta_mixer, kernels, projections, sparse_moe
from .ops.gated_delta import delta_rule, l2norm

# Of max(1, |reference|), per element. The kernels accumulate in fp32; a reference in bf16 may not (the CPU's
# quantized matmul is off by ~2.5% of its output's scale at H = 128, the kernel by 0.2%), so its side sets these.
TOLERANCE = {mx.float32: 4e-5, mx.bfloat16: 6e-2, mx.float16: 8e-3}


@dataclass(frozen=True)
class Sizes:
    gdn: GDNDims
    hidden: int
    experts: int
    top_k: int
    intermediate: int
    attention_width: int  # heads * head_dim: attention's o_proj input
    prefill: int


REAL = Sizes(GDNDims(16, 128, 32, 128, 4, 1e-6), 2048, 256, 8, 512, 16 * 256, 512)
SMALL = Sizes(GDNDims(2, 32, 4, 16, 4, 1e-6), 128, 16, 4, 64, 256, 37)


@dataclass
class Case:
    kernel: str
    label: str
    dtype: mx.Dtype
    run: Callable[[], Any]  # the op on fixed inputs; returns arrays


def random_quantized(module: nn.Module, bits: int, group: int) -> nn.Module:
    """`module` with its linears quantized and their packed weights, scales and biases replaced by random ones
    (centred, so outputs stay O(1)). Setting them directly spares quantizing fp32 stacks of 256 experts."""
    nn.quantize(module, group_size=group, bits=bits)
    for _, layer in module.named_modules():
        if "scales" not in layer:
            continue
        width = layer["scales"].shape[-1] * group
        dtype = layer["scales"].dtype
        scale = mx.random.uniform(0.5, 1.5, layer["scales"].shape) * (2.0 / (2**bits - 1)) / width**0.5
        layer.weight = _random_words(layer["weight"].shape)
        layer.scales = scale.astype(dtype)
        layer.biases = (-scale * (2**bits - 1) / 2).astype(dtype)
    mx.eval(module.parameters())
    return module


def _random_words(shape: tuple[int, ...]) -> mx.array:
    """Uniform random uint32 words (every packed weight value equally likely)."""
    half = [mx.random.randint(0, 1 << 16, shape).astype(mx.uint32) for _ in range(2)]
    return (half[0] << 16) | half[1]


class Block(nn.Module):
    """The MoE block's parameters, as `SparseMoeBlock` holds them."""

    def __init__(self, s: Sizes):
        super().__init__()
        self.gate = nn.Linear(s.hidden, s.experts, bias=False)
        self.experts = SwitchGLU(s.hidden, s.intermediate, s.experts)
        self.shared_expert = MLP(s.hidden, s.intermediate)
        self.shared_expert_gate = nn.Linear(s.hidden, 1, bias=False)


def gdn_cases(s: Sizes, dtype: mx.Dtype) -> list[Case]:
    d = s.gdn
    cases = []
    for T in (1, 4, s.prefill):
        r = mx.random.normal
        B, C, Hv, Dv = 1, d.conv_dim, d.num_v_heads, d.head_v_dim
        args = (r((B, T, C)).astype(dtype), r((B, T, Hv)).astype(dtype), r((B, T, Hv)).astype(dtype),
                r((B, T, Hv * Dv)).astype(dtype), (r((C, d.conv_kernel, 1)) * 0.5).astype(dtype), r((Hv,)) * 0.5,
                mx.random.uniform(0.5, 1.5, (Hv,)), mx.random.uniform(0.5, 1.5, (Dv,)),
                r((B, d.conv_kernel - 1, C)).astype(dtype), r((B, Hv, Dv, d.head_k_dim)) * 0.3)
        mx.eval(args)
        label = f"T={T} ({'decode' if T == 1 else 'verify' if T < 16 else 'prefill'})"
        cases.append(Case("gdn_mixer", label, dtype, lambda a=args: tuple(gated_delta_mixer(d, *a)[:3])))
    T = 4 * s.prefill  # several chunks of the chunk-parallel form
    q, k = (l2norm(mx.random.normal((1, T, d.num_k_heads, d.head_k_dim))) for _ in range(2))
    rule = (q * d.head_k_dim**-0.5, k, mx.random.normal((1, T, d.num_v_heads, d.head_v_dim)),
            -mx.random.uniform(0.01, 0.5, (1, T, d.num_v_heads)), mx.random.uniform(0.1, 0.9, (1, T, d.num_v_heads)),
            mx.random.normal((1, d.num_v_heads, d.head_k_dim, d.head_v_dim)) * 0.3)
    mx.eval(rule)
    cases.append(Case("gdn_chunk_scan", f"T={T} (prefill, chunked)", mx.float32, lambda: delta_rule(*rule)))
    return cases


def moe_cases(s: Sizes, dtype: mx.Dtype, bits: int, group: int) -> list[Case]:
    block = Block(s)
    block.set_dtype(dtype)
    random_quantized(block, bits, group)
    cases = []
    for N in (1, 4):
        x = unambiguous_tokens(block, N, s, dtype)
        cases.append(Case("moe", f"N={N}, {bits}-bit g{group}", dtype, lambda x=x: sparse_moe(
            x, block.gate, block.experts, block.shared_expert, block.shared_expert_gate, s.top_k)))
    return cases


def unambiguous_tokens(block: Block, N: int, s: Sizes, dtype: mx.Dtype, tries: int = 100) -> mx.array:
    """N random tokens whose k-th and (k+1)-th router logits are at least two bf16 steps apart. The kernels compute
    the logits in fp32 and the reference rounds them to `dtype`: a near tie could route a token to another expert,
    which is a rounding choice, not an error, but would show as a large difference."""
    for _ in range(tries):
        x = mx.random.normal((N, s.hidden)).astype(dtype)
        with kernels.forced("off"):
            logits = projections(x, [block.gate])[0].astype(mx.float32)
        top = mx.sort(logits, axis=-1)[:, ::-1]
        gap = top[:, s.top_k - 1] - top[:, s.top_k]
        if bool(mx.all(gap >= 2 * 2**-7 * mx.maximum(1.0, mx.abs(top[:, s.top_k - 1])))):
            return x
    raise RuntimeError("no tokens with an unambiguous routing were drawn")


def qmv_cases(s: Sizes, dtype: mx.Dtype, bits: int, group: int) -> list[Case]:
    d = s.gdn
    in_proj = [nn.Linear(s.hidden, n, bias=False)
               for n in (d.conv_dim, d.num_v_heads * d.head_v_dim, d.num_v_heads, d.num_v_heads)]
    o_proj = nn.Linear(s.attention_width, s.hidden, bias=False)
    for layer in (*in_proj, o_proj):
        layer.set_dtype(dtype)
    wrap = nn.Module()
    wrap.layers = in_proj + [o_proj]
    random_quantized(wrap, bits, group)
    in_proj, o_proj = wrap.layers[:4], wrap.layers[4]
    x = mx.random.normal((1, s.hidden)).astype(dtype)
    o, gate, residual = (mx.random.normal((1, n)).astype(dtype) for n in (s.attention_width,) * 2 + (s.hidden,))
    mx.eval(x, o, gate, residual)
    return [Case("qmv", f"GDN in_proj x4, {bits}-bit g{group}", dtype, lambda: projections(x, wrap.layers[:4])),
            Case("qmv", "o_proj, gate + residual", dtype,
                 lambda: projections(o, [wrap.layers[4]], gate=gate, residual=residual))]


def cases(s: Sizes, dtype: mx.Dtype = mx.bfloat16, bits: int = 4, group: int = 64) -> list[Case]:
    mx.random.seed(0)
    return gdn_cases(s, dtype) + moe_cases(s, dtype, bits, group) + qmv_cases(s, dtype, bits, group)


def _flat(out: Any) -> list[mx.array]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check(case: Case, repeats: int = 5) -> dict[str, Any]:
    """One case: {kernel, case, error, tolerance, ok, kernel_ms, reference_ms, fell_back}."""
    with kernels.forced("off"):
        want = _flat(case.run())
        mx.eval(want)
        reference_s = kernels.measure(case.run, (), repeats)
    kernels.reset()
    with kernels.forced("on"):
        got = _flat(case.run())
        mx.eval(got)
        kernel_s = kernels.measure(case.run, (), repeats)
    fell_back = kernels.failed(case.kernel) is not None
    error = max(float(mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max()) for g, w in zip(got, want))
    scale = max(max(1.0, float(mx.abs(w.astype(mx.float32)).max())) for w in want)
    tolerance = TOLERANCE[case.dtype] * scale
    return {"kernel": case.kernel, "case": case.label, "dtype": str(case.dtype).split(".")[-1], "error": error,
            "tolerance": tolerance, "ok": error <= tolerance and not fell_back and len(got) == len(want),
            "kernel_ms": kernel_s * 1e3, "reference_ms": reference_s * 1e3, "fell_back": fell_back}


def check_all(real: bool | None = None, dtype: mx.Dtype = mx.bfloat16, bits: int = 4, group: int = 64,
              repeats: int = 5) -> dict[str, Any]:
    """Every case; `real` sizes by default on Metal, small ones elsewhere (where the emulator runs them)."""
    real = kernels.on_metal() if real is None else real
    where = "metal" if kernels.on_metal() else "emulator"
    rows = [check(c, repeats) for c in cases(REAL if real else SMALL, dtype, bits, group)]
    return {"backend": where, "sizes": "real" if real else "small", "device": kernels.device_name(), "rows": rows,
            "ok": all(r["ok"] for r in rows)}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Kernels vs references ({result['backend']}, {result['sizes']} sizes, {result['device']})", "",
             "| kernel | case | dtype | max error | tolerance | kernel ms | reference ms | |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        verdict = "ok" if r["ok"] else ("FELL BACK" if r["fell_back"] else "FAIL")
        lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['error']:.2e} | {r['tolerance']:.2e} | "
                     f"{r['kernel_ms']:.3f} | {r['reference_ms']:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"
