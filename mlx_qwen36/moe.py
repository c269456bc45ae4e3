"""Feed-forward blocks: the dense SwiGLU MLP (27B) and the routed MoE with a gated shared expert (35B-A3B)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig

# Below this many (token, expert) pairs, sorting tokens by expert costs more than it saves.
SORT_THRESHOLD = 64


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def router(logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Softmax over all experts in fp32, top-k, renormalise: (indices [..., k], weights [..., k] in logits' dtype)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    inds = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(probs, inds, axis=-1)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return inds, weights.astype(logits.dtype)


def _gather_matmul_dtype(dtype: mx.Dtype) -> mx.Dtype:
    # MLX's CPU gather_mm accepts only float32; compute a bf16/fp16 model's expert matmuls in fp32 there.
    return mx.float32 if mx.default_device() == mx.cpu else dtype


class SwitchLinear(nn.Module):
    """A stack of expert linears, weight [E, out, in], applied to the experts each token was routed to."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        dtype = _gather_matmul_dtype(self.weight.dtype)
        w = self.weight.astype(dtype).swapaxes(-1, -2)
        y = mx.gather_mm(x.astype(dtype), w, rhs_indices=indices, sorted_indices=sorted_indices)
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

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices, transpose=True,
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
        x = x[:, None, None, :]  # [N, 1, 1, H]
        do_sort = indices.size >= SORT_THRESHOLD
        if do_sort:
            # Group rows by expert so each expert's weights are read once for the whole prefill chunk.
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]  # [N*k, 1, H]
            idx = flat[order]
        else:
            idx = indices
        h = self.gate_up_proj(x, idx, sorted_indices=do_sort)
        gate, up = mx.split(h, 2, axis=-1)
        y = self.down_proj(nn.silu(gate) * up, idx, sorted_indices=do_sort)
        if do_sort:
            return y[inv_order].reshape(N, k, -1)
        return y.squeeze(-2)


class SparseMoeBlock(nn.Module):
    """y = Σ_k w_k·expert_k(x) + sigmoid(shared_expert_gate(x))·shared_expert(x)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        inds, weights = router(self.gate(x), self.top_k)
        y = (self.experts(x, inds) * weights[..., None]).sum(axis=1)
        y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)
