"""The op layer: every hot op of the model behind one boundary, with a pure-MLX reference and its back ends.

| op | reference | Metal kernel | CPU form |
|---|---|---|---|
| `gated_delta_mixer` | conv, norms, gates, delta rule | `gdn_mixer`, `gdn_chunk_scan` (prefill) | two threads |
| `sparse_moe` | `router` + gathered expert matmuls | `moe_router`, `moe_gate_up`, `moe_down` | fp32 gathers |
| `projections` | each layer's matmul | `qmv` (several weights, gate, residual) | the stored layout |
| `attention`, `rotary_decode` | `mx.fast` SDPA and RoPE | (MLX's own) | grouped matmul, explicit rotation |

Model files call these and nothing below them. Whether a kernel runs is decided in `kernels` (MLX_QWEN36_KERNELS,
failures, timed choice); the CPU back end's weight layout and second thread are in `cpu`.
"""

from .attention import attention, rotary_decode
from .cpu import (
                  CPULinear,
                  cpu_gather_needs_fp32,
                  gather_matmul_fp32,
                  relayout_for_cpu,
                  split_rows,
                  stored_transpose,
                  worker_stream,
)
from .gated_delta import GDNDims, GDNOutput, gated_delta_mixer
from .linear import projections
from .moe import SORT_THRESHOLD, router, sparse_moe

__all__ = ["CPULinear", "GDNDims", "GDNOutput", "SORT_THRESHOLD", "attention", "cpu_gather_needs_fp32",
           "gated_delta_mixer", "gather_matmul_fp32", "projections", "relayout_for_cpu", "rotary_decode", "router",
           "sparse_moe", "split_rows", "stored_transpose", "worker_stream"]
