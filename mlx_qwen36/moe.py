"""Feed-forward blocks: the dense SwiGLU MLP (27B) and the routed MoE with a gated shared expert (35B-A3B).

The block's maths (router, experts, combine) is the op `ops.sparse_moe`: fused Metal kernels for a few tokens, and
this file's expert stacks for the rest. The routed experts read each token's experts with gathered matmuls: gate
and up projections are one stacked weight (one gather), SwiGLU is one fused expression. Prefill sorts the
(token, expert) pairs by expert so each expert's weights are read once per chunk.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .ops import (
    SORT_THRESHOLD,
    cpu_gather_needs_fp32,
    gather_matmul_fp32,
    projections,
    sparse_moe,
    split_rows,
    stored_transpose,
)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """x [..., H] -> [..., H], plus `residual` (the block's skip connection, added in the same launch)."""
        gate, up = projections(x, [self.gate_proj, self.up_proj])
        return projections(swiglu(gate, up), [self.down_proj], residual=residual)[0]


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@lru_cache(maxsize=32)
def _lhs_indices(*shape: int) -> mx.array:
    """`gather_mm`'s default lhs_indices (every lhs matrix in order, laid out as `shape`), made once as a constant
    so a traced decode step does not rebuild it each token."""
    n = 1
    for d in shape:
        n *= d
    idx = mx.arange(n, dtype=mx.uint32).reshape(shape)
    mx.eval(idx)
    return idx


class SwitchLinear(nn.Module):
    """A stack of expert linears, weight [E, out, in], applied to the experts each token was routed to."""

    expert_stack = True  # `ops.relayout_for_cpu` stores it [E, in, out]

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False,
                 lhs_indices: mx.array | None = None) -> mx.array:
        w = stored_transpose(self)  # [E, in, out] after `ops.relayout_for_cpu`
        if w is None and cpu_gather_needs_fp32(self.weight.dtype):
            return gather_matmul_fp32(x, self.weight, indices, sorted_indices, lhs_indices)
        if w is None:
            w = self.weight.swapaxes(-1, -2)
        y = mx.gather_mm(x.astype(w.dtype), w, lhs_indices=lhs_indices, rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return y.astype(x.dtype)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> QuantizedSwitchLinear:
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, *biases = mx.quantize(w, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int, bits: int, mode: str) -> QuantizedSwitchLinear:
        E, out, inp = layer.weight.shape
        q = cls(inp, out, E, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(layer.weight, group_size, bits, mode=mode)
        if biases:
            q.biases = biases[0]
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False,
                 lhs_indices: mx.array | None = None) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), lhs_indices=lhs_indices, rhs_indices=indices,
            transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """The routed experts. Gate and up projections are one stacked weight [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up),
    so each token reads its experts' gate and up rows in a single gathered matmul."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = SwitchLinear(hidden, 2 * intermediate, num_experts)
        self.down_proj = SwitchLinear(intermediate, hidden, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, H], indices [N, k] -> per-expert outputs [N, k, H]."""
        N, k = indices.shape
        if indices.size < SORT_THRESHOLD:
            x = x.reshape(N, 1, 1, -1)  # [N, 1, 1, H]: each row meets its k experts
            h = self.gate_up_proj(x, indices, lhs_indices=_lhs_indices(N, 1))  # [N, k, 1, 2I]
            y = self.down_proj(swiglu(*mx.split(h, 2, axis=-1)), indices, lhs_indices=_lhs_indices(N, k))
            return y.reshape(N, k, -1)
        # Group rows by expert so each expert's weights are read once for the whole prefill chunk.
        flat = indices.flatten()
        order = mx.argsort(flat)
        inv_order = mx.argsort(order)
        x = x[order // k][:, None, :]  # [N*k, 1, H]
        y = split_rows(self._sorted, x, flat[order])  # halves of the sorted pairs on two CPU threads
        return y[inv_order].reshape(N, k, -1)

    def _sorted(self, x: mx.array, idx: mx.array) -> mx.array:
        """x [P, 1, H] with expert ids idx [P] in ascending order -> [P, 1, H]."""
        h = self.gate_up_proj(x, idx, sorted_indices=True)
        return self.down_proj(swiglu(*mx.split(h, 2, axis=-1)), idx, sorted_indices=True)


class SparseMoeBlock(nn.Module):
    """y = Σ_k w_k·expert_k(x) + sigmoid(shared_expert_gate(x))·shared_expert(x)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """x [..., H] -> [..., H], plus `residual` (the block's skip connection, added in the same launch)."""
        shape = x.shape
        flat = None if residual is None else residual.reshape(-1, shape[-1])
        y = sparse_moe(x.reshape(-1, shape[-1]), self.gate, self.experts, self.shared_expert,
                       self.shared_expert_gate, self.top_k, residual=flat)
        return y.reshape(shape)
