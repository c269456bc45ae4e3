"""The memory plan of a checkpoint at a context length, made before anything is loaded.

What a generation holds: the weights (from the checkpoint's safetensors headers, split into the text model, the MTP
head and the vision tower), the KV cache of the attention layers (the only part that grows with the context: 10 of
the 35B-A3B's 40 layers, ~20 KB per token in bf16; `kv_bits` shrinks it), the GDN layers' fixed conv and recurrent
states, and the prefill's working memory (bounded by the chunk, not the prompt). `plan(...)` adds them up against
what this machine can hold without swapping (90% of its physical memory) and gives the longest context that fits.
The CLIs refuse a `--max-context` that does not fit, and otherwise cap the context at the longest that does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, context_reach, with_max_context

HEADROOM = 0.9  # of the machine's memory a plan may use: the OS and other programs keep the rest
PREFILL_CHUNK = 512


class MemoryPlanError(ValueError):
    """A context that does not fit this machine; the message gives the longest that does."""


@dataclass
class MemoryPlan:
    context: int
    weights: int  # the text model
    mtp: int
    vision: int
    kv_per_token: int
    gdn_state: int
    prefill: int  # working memory of one prefill chunk
    available: int
    with_mtp: bool = False  # the MTP head and the vision tower count only when they are loaded
    with_vision: bool = False
    reach: int = 1 << 62  # the longest context the checkpoint runs at (YaRN included)

    @property
    def kv(self) -> int:
        return self.kv_per_token * self.context

    @property
    def total(self) -> int:
        return (self.weights + self.mtp * self.with_mtp + self.vision * self.with_vision + self.kv + self.gdn_state
                + self.prefill)

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    @property
    def max_context(self) -> int:
        """The longest context whose KV fits beside everything else (0 when not even the weights fit)."""
        free = self.available - (self.total - self.kv)
        return max(0, min(free // self.kv_per_token, self.reach))

    def table(self) -> str:
        rows = [("weights (text model)", self.weights),
                ("MTP head" + ("" if self.with_mtp else " (not loaded: --mtp loads it)"), self.mtp),
                ("vision tower" + ("" if self.with_vision else " (not loaded)"), self.vision),
                (f"KV cache at {self.context:,} tokens ({self.kv_per_token:,} B/token)", self.kv),
                ("GDN states", self.gdn_state),
                (f"prefill working memory ({PREFILL_CHUNK}-token chunks)", self.prefill),
                ("total", self.total), ("this machine can hold", self.available)]
        lines = ["| part | size |", "|---|---:|"] + [f"| {name} | {_size(n)} |" for name, n in rows]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"\n{self.context:,} tokens {verdict}; the longest context that fits: "
                     f"{self.max_context:,} tokens (the checkpoint runs at up to {self.reach:,}).")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def available_bytes() -> int:
    """What this machine can hold without swapping: its physical memory times HEADROOM. (On a Mac the GPU's
    recommended working set is less: it is what stays wired, and the generator warns when the weights exceed it,
    but memory past it is used without swapping.)"""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * HEADROOM)


def weight_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the checkpoint's tensors by part ("text", "mtp", "vision"), from the safetensors headers."""
    from .loader import SAFETENSORS_DTYPES, check_safetensors, checkpoint_files

    out = {"text": 0, "mtp": 0, "vision": 0}
    for f in checkpoint_files(folder):
        for name, entry in check_safetensors(f).items():
            count = 1
            for d in entry["shape"]:
                count *= d
            part = "mtp" if name.startswith("mtp.") else "vision" if "visual." in name else "text"
            out[part] += count * SAFETENSORS_DTYPES[entry["dtype"]]
    return out


def kv_bytes_per_token(config: ModelConfig, kv_bits: int | None = None, kv_group_size: int = 64,
                       mtp: bool = False, dtype_bytes: int = 2) -> int:
    """Keys and values of one token in every attention layer (and the MTP head's, with `mtp`)."""
    t = config.text
    layers = sum(1 for kind in t.layer_types if kind == "full_attention") + (1 if mtp else 0)
    per_value = dtype_bytes if kv_bits is None else kv_bits / 8 + 2 * dtype_bytes / kv_group_size
    return int(layers * 2 * t.num_key_value_heads * t.head_dim * per_value)


def gdn_state_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    t = config.text
    layers = sum(1 for kind in t.layer_types if kind == "linear_attention")
    conv = (t.linear_conv_kernel_dim - 1) * t.linear_conv_dim * dtype_bytes
    recurrent = t.linear_num_value_heads * t.linear_value_head_dim * t.linear_key_head_dim * 4
    return layers * (conv + recurrent)


def prefill_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """The largest working set of one prefill chunk: the MoE's gathered expert activations and the GDN chunk form's
    per-chunk matrices. Attention adds nothing that grows with the context: MLX's SDPA (Metal and CPU alike)
    does not hold the chunk's [heads, T, S] scores (`tests/test_long_context.py` measures the peak)."""
    t = config.text
    experts = PREFILL_CHUNK * max(t.num_experts_per_tok, 1) * 3 * max(t.moe_intermediate_size, t.intermediate_size)
    gdn = PREFILL_CHUNK * (t.linear_conv_dim + t.linear_num_value_heads * (64 + t.linear_value_head_dim)) * 4
    return int(experts * dtype_bytes + gdn)


def plan(folder: str | Path, context: int | None = None, kv_bits: int | None = None, kv_group_size: int = 64,
         mtp: bool = False, vision: bool = False, available: int | None = None) -> MemoryPlan:
    """The plan of the checkpoint in `folder` at `context` tokens (default: its native context; past it, YaRN as
    `load(max_context=...)` would switch it on)."""
    folder = Path(folder)
    config = ModelConfig.from_file(folder / "config.json")
    if context is not None:
        config = with_max_context(config, context)
    context = context or config.text.max_position_embeddings
    parts = weight_bytes(folder)
    return MemoryPlan(
        context=context, weights=parts["text"], mtp=parts["mtp"], vision=parts["vision"], with_mtp=mtp,
        with_vision=vision,
        kv_per_token=kv_bytes_per_token(config, kv_bits, kv_group_size, mtp and parts["mtp"] > 0),
        gdn_state=gdn_state_bytes(config), prefill=prefill_bytes(config),
        available=available if available is not None else available_bytes(), reach=context_reach(config))


def limit_context(model: Any, tokens: int) -> None:
    """Cap the context the generator lets `model` reach (prompt + reply) at `tokens`: what the plan allows."""
    object.__setattr__(model, "context_limit", tokens)


def context_of(model: Any) -> int:
    """The longest prompt + reply the generator lets `model` reach: its config's, or what `limit_context` set."""
    native = model.config.text.max_position_embeddings
    return min(native, model.__dict__.get("context_limit", native))


def check_fits(folder: str | Path, max_context: int | None, **options: Any) -> int:
    """The context to serve: `max_context` when it fits (MemoryPlanError naming the longest that does when it does
    not); without one, the checkpoint's context capped at what fits."""
    p = plan(folder, max_context, **options)
    if max_context is not None and not p.fits:
        raise MemoryPlanError(f"a context of {max_context:,} tokens does not fit this machine: it needs "
                              f"{p.total / 1e9:.1f} GB, {p.available / 1e9:.1f} GB is available; the longest that "
                              f"fits is {p.max_context:,} tokens (or use --kv-bits 8 or 4)")
    if p.max_context < 1:
        raise MemoryPlanError(f"the weights alone ({(p.total - p.kv) / 1e9:.1f} GB) do not fit the "
                              f"{p.available / 1e9:.1f} GB this machine can hold")
    return min(p.context, p.max_context)
