"""Which module is quantized how: the recipes.

Rules common to every recipe: conv1d, norms, `A_log` and `dt_bias` are never quantized (they are not matmul
weights); the router (`mlp.gate`) and `shared_expert_gate` are always 8-bit affine with group 64 (a 4-bit router
reroutes tokens); a matrix whose input dimension is not a multiple of the group size stays unquantized; the vision
tower stays in the working dtype unless asked.

Recipes:
- `uniform`: every other matmul weight at `--bits`;
- `mixed`: routed experts at `--bits`; attention and GDN projections, the shared expert, embeddings and lm_head at
  8 bits. The experts are ~90% of the 35B-A3B weights, so this costs little size and keeps the always-on paths
  precise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RECIPES = ("uniform", "mixed")
MODES = {"affine": {2, 3, 4, 5, 6, 8}, "mxfp4": {4}, "mxfp8": {8}}
GROUP_SIZES = (32, 64, 128)

ROUTER = re.compile(r"\.mlp\.(gate|shared_expert_gate)$")
EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
VISION_MATMUL = re.compile(r"^visual\..*(attn\.qkv|attn\.proj|linear_fc1|linear_fc2)$")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


ROUTER_SPEC = QuantSpec(bits=8, group_size=64, mode="affine")


def check_arguments(bits: int, group_size: int, mode: str, recipe: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode {mode}: choose one of {sorted(MODES)}")
    if bits not in MODES[mode]:
        raise ValueError(f"--bits {bits} is not available with --mode {mode} (allowed: {sorted(MODES[mode])})")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: choose one of {list(GROUP_SIZES)}")
    if mode != "affine" and group_size != 32:
        raise ValueError(f"--mode {mode} needs --group-size 32")
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe}: choose one of {list(RECIPES)}")


def is_matmul_weight(module: str, ndim: int) -> bool:
    """Quantizable: a Linear, an Embedding or a stacked expert Linear (not conv, norm or GDN scalars)."""
    if module.startswith("visual."):
        return VISION_MATMUL.search(module) is not None and ndim == 2
    if "conv1d" in module or "norm" in module.rsplit(".", 1)[-1]:
        return False
    return ndim in (2, 3)


def quant_spec(module: str, shape: tuple[int, ...], *, bits: int, group_size: int, mode: str, recipe: str,
               quantize_vision: bool = False) -> QuantSpec | None:
    """The quantization of one module's weight, or None to keep it in the working dtype."""
    if not is_matmul_weight(module, len(shape)):
        return None
    if module.startswith("visual.") and not quantize_vision:
        return None
    if ROUTER.search(module):
        spec = ROUTER_SPEC
    elif recipe == "mixed" and not EXPERTS.search(module):
        spec = QuantSpec(8, group_size if mode == "affine" else 32, mode if mode == "affine" else "mxfp8")
    else:
        spec = QuantSpec(bits, group_size, mode)
    if shape[-1] % spec.group_size:
        return None
    return spec
