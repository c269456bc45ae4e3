"""The MoE block as one op: router, routed experts, shared expert and the weighted combine.

`sparse_moe` is the boundary the block calls. For a few tokens (decode, speculative verification) with affine 4- or
8-bit experts it runs three Metal kernels after the two router matmuls (metal/moe_*.metal):
- `moe_router`: top-k of the router logits by SIMD max-reductions (no sort) and the fp32 softmax over the k picked
  logits, plus the shared expert's sigmoid gate;
- `moe_gate_up`: gate and up rows of every routed expert and of the shared expert, with SwiGLU;
- `moe_down`: the down rows of every slot and the weighted sum.
mlx-lm's form of the same block is about twenty launches. Elsewhere (prefill, unquantized experts, other bits) the
reference runs: `router`, then the experts' gathered matmuls (`SwitchGLU`, sorted by expert for many tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .linear import projections

# Below this many (token, expert) pairs, sorting tokens by expert costs more than it saves; the fused kernels read
# each pair's expert rows on their own, so they serve the same small cases.
SORT_THRESHOLD = 64
KERNEL_BITS = (4, 8)
KERNEL_GROUPS = (32, 64, 128)


def router(logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Top-k experts and their renormalised softmax weights: (indices [..., k], weights [..., k] in logits' dtype).

    Renormalising the top-k of softmax(l) over all experts is exactly softmax over the top-k logits (the full
    normaliser cancels), so only the k selected logits are exponentiated, in fp32. The weights are cast back to
    the logits' (the hidden state's) dtype, as the reference does: fp32 weights would promote the expert sum, and
    from there the residual stream, every activation and every cache of a bf16 model, to fp32.
    """
    E = logits.shape[-1]
    inds = mx.argpartition(logits, kth=E - top_k, axis=-1)[..., E - top_k :]
    top = mx.take_along_axis(logits, inds, axis=-1).astype(mx.float32)
    weights = mx.softmax(top, axis=-1, precise=True)
    return inds, weights.astype(logits.dtype)


@dataclass(frozen=True)
class FusedSpec:
    """What the fused kernels are instantiated for."""

    top_k: int
    hidden: int
    intermediate: int
    shared_intermediate: int  # 0: the shared expert is not in the kernels (it runs as its own ops)
    bits: int
    group_size: int


def sparse_moe(x: mx.array, gate: nn.Module, experts: nn.Module, shared_expert: nn.Module,
               shared_expert_gate: nn.Module, top_k: int, residual: mx.array | None = None) -> mx.array:
    """y = Σ_k w_k·expert_k(x) + sigmoid(shared_expert_gate(x))·shared_expert(x) (+ residual), x [N, H] -> [N, H].

    The router's two gates are one `projections` launch for a few tokens."""
    logits, shared_logit = projections(x, [gate, shared_expert_gate])
    spec = fused_spec(x, experts, shared_expert, top_k)
    if spec is None:
        y = _reference(x, logits, shared_logit, experts, shared_expert, top_k)
        return y if residual is None else residual + y
    if not spec.shared_intermediate and residual is not None:  # the shared expert's sum then carries the residual
        residual = residual + mx.sigmoid(shared_logit) * shared_expert(x)
        shared_expert = None
    arrays = (x, logits, shared_logit, residual, *_quantized(experts.gate_up_proj), *_quantized(experts.down_proj))
    if spec.shared_intermediate:
        arrays += (*_quantized(shared_expert.gate_proj), *_quantized(shared_expert.up_proj),
                   *_quantized(shared_expert.down_proj))
    key = ("moe", str(x.dtype), str(arrays[5].dtype), x.shape[0], spec, residual is not None)
    y = kernels.dispatch("moe", key, partial(_fused, spec), partial(_fused_reference, spec), arrays)
    if not spec.shared_intermediate and shared_expert is not None:
        y = y + mx.sigmoid(shared_logit) * shared_expert(x)
    return y


def _reference(x: mx.array, logits: mx.array, shared_logit: mx.array, experts: nn.Module, shared_expert: nn.Module,
               top_k: int) -> mx.array:
    inds, weights = router(logits, top_k)
    y = weights[:, None, :] @ experts(x, inds)  # [N, 1, k] @ [N, k, H]: the weighted sum over experts
    return y.reshape(x.shape) + mx.sigmoid(shared_logit) * shared_expert(x)


def _quantized(layer: nn.Module) -> tuple[mx.array, mx.array, mx.array]:
    return layer["weight"], layer["scales"], layer["biases"]


def _affine(layer: nn.Module) -> tuple[int, int] | None:
    """(bits, group size) of an affine-quantized layer the kernels read, else None."""
    if getattr(layer, "mode", "affine") != "affine" or "scales" not in layer or "biases" not in layer:
        return None
    bits, group = getattr(layer, "bits", None), getattr(layer, "group_size", None)
    return (bits, group) if bits in KERNEL_BITS and group in KERNEL_GROUPS else None


def fused_spec(x: mx.array, experts: nn.Module, shared_expert: nn.Module, top_k: int) -> FusedSpec | None:
    """The kernels' instantiation for this call, or None where they do not cover it (many tokens, unquantized or
    other-bit experts, non-float activations)."""
    if x.shape[0] * top_k >= SORT_THRESHOLD or not mx.issubdtype(x.dtype, mx.floating):
        return None
    q = _affine(experts.gate_up_proj)
    if q is None or _affine(experts.down_proj) != q:
        return None
    E, two_i, _ = experts.gate_up_proj["scales"].shape
    H = x.shape[-1]
    shared = [_affine(getattr(shared_expert, n, None) or nn.Module()) for n in ("gate_proj", "up_proj", "down_proj")]
    shared_i = shared_expert.gate_proj["scales"].shape[0] if all(s == q for s in shared) else 0
    return FusedSpec(top_k, H, two_i // 2, shared_i, *q)


ROUTER = kernels.Kernel("moe_router", ["logits", "shared_logit"], ["inds", "weights"])
GATE_UP = kernels.Kernel(
    "moe_gate_up",
    ["x", "inds", "w", "scales", "biases", "shared_gate_w", "shared_gate_scales", "shared_gate_biases",
     "shared_up_w", "shared_up_scales", "shared_up_biases"],
    ["act"],
)
DOWN = kernels.Kernel(
    "moe_down",
    ["act", "inds", "weights", "residual", "w", "scales", "biases", "shared_w", "shared_scales", "shared_biases"],
    ["y"],
)
ROWS_PER_THREADGROUP = 4  # SIMD-groups per threadgroup in the matvec kernels


def _fused(spec: FusedSpec, x: mx.array, logits: mx.array, shared_logit: mx.array, residual: mx.array | None,
           gu_w: mx.array, gu_s: mx.array, gu_b: mx.array, d_w: mx.array, d_s: mx.array, d_b: mx.array,
           *shared: mx.array) -> mx.array:
    N, H = x.shape
    E = logits.shape[-1]
    K, inter, IS = spec.top_k, spec.intermediate, spec.shared_intermediate
    slots = K + (1 if IS else 0)
    has_shared = IS > 0
    quant = [("BITS", spec.bits), ("GS", spec.group_size)]
    inds, weights = ROUTER(
        inputs=[logits, shared_logit], output_shapes=[(N, K), (N, slots)], output_dtypes=[mx.uint32, x.dtype],
        grid=(32, N, 1), threadgroup=(32, 1, 1),
        template=[("T", logits.dtype), ("E", E), ("K", K), ("HAS_SHARED", has_shared)],
    )
    none = (kernels.absent(mx.uint32), kernels.absent(gu_s.dtype), kernels.absent(gu_s.dtype))
    sg = shared[:6] if has_shared else none * 2
    imax = max(inter, IS)
    (act,) = GATE_UP(
        inputs=[x, inds, gu_w, gu_s, gu_b, *sg], output_shapes=[(N, slots, imax)], output_dtypes=[x.dtype],
        grid=(32, imax, N * slots), threadgroup=(32, ROWS_PER_THREADGROUP, 1),
        template=[("T", x.dtype), ("H", H), ("I", inter), ("IS", max(IS, 1)), ("K", K), *quant,
                  ("HAS_SHARED", has_shared)],
    )
    sd = shared[6:] if has_shared else none
    (y,) = DOWN(
        inputs=[act, inds, weights, kernels.absent(x.dtype) if residual is None else residual, d_w, d_s, d_b, *sd],
        output_shapes=[(N, H)], output_dtypes=[x.dtype], grid=(32, H, N), threadgroup=(32, ROWS_PER_THREADGROUP, 1),
        template=[("T", x.dtype), ("H", H), ("I", inter), ("IS", max(IS, 1)), ("K", K), *quant,
                  ("HAS_SHARED", has_shared), ("RESIDUAL", residual is not None)],
    )
    return y


def _fused_reference(spec: FusedSpec, x: mx.array, logits: mx.array, shared_logit: mx.array,
                     residual: mx.array | None, gu_w: mx.array, gu_s: mx.array, gu_b: mx.array, d_w: mx.array,
                     d_s: mx.array, d_b: mx.array, *shared: mx.array) -> mx.array:
    """What the three kernels compute, in MLX ops on the same arrays (the routed experts' gathered matmuls, the
    shared expert's when it is in the kernels)."""
    N, _ = x.shape
    q: dict[str, Any] = {"transpose": True, "group_size": spec.group_size, "bits": spec.bits}
    inds, weights = router(logits, spec.top_k)
    h = mx.gather_qmm(x.reshape(N, 1, 1, -1), gu_w, gu_s, gu_b, rhs_indices=inds, **q)  # [N, k, 1, 2I]
    gate, up = mx.split(h, 2, axis=-1)
    y = mx.gather_qmm(nn.silu(gate) * up, d_w, d_s, d_b, rhs_indices=inds, **q)  # [N, k, 1, H]
    y = (weights[:, None, :] @ y.reshape(N, spec.top_k, -1)).reshape(N, -1)
    if spec.shared_intermediate:
        sgw, sgs, sgb, suw, sus, sub, sdw, sds, sdb = shared
        a = nn.silu(mx.quantized_matmul(x, sgw, sgs, sgb, **q)) * mx.quantized_matmul(x, suw, sus, sub, **q)
        y = y + mx.sigmoid(shared_logit) * mx.quantized_matmul(a, sdw, sds, sdb, **q)
    return y if residual is None else residual + y
