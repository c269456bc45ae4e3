"""The rules that turn Hugging Face Qwen3.6 tensors into this package's MLX layout.

Shared by the loader (raw HF checkpoints, converted in memory) and the converter (written to disk), so a rule lives
in exactly one place. Each rule here has a test that breaks when the rule does.

- names: `model.language_model.` and text-only `model.` prefixes become `model.`; `model.visual.` becomes `visual.`;
  `mtp.*` and `lm_head` keep their names;
- zero-centred RMSNorm weights get +1 and stay fp32, so the norm multiplies in fp32 and casts once, as the
  reference does; `linear_attn.norm` is plain and gets no +1;
- conv1d `[C, 1, K]` becomes MLX's `[C, K, 1]`;
- experts, fused (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`) or per expert
  (`experts.{e}.{gate,up,down}_proj.weight`), become `experts.gate_up_proj.weight [E, 2I, H]` (gate rows first)
  and `experts.down_proj.weight [E, H, I]`;
- the vision patch embedding (a Conv3d) becomes channels-last `[out, T, py, px, C]`, as MLX convolutions and
  mlx-vlm checkpoints have it;
- `A_log` and `dt_bias` are kept in fp32 (`keeps_fp32` lists every tensor a dtype cast must leave alone).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator

import mlx.core as mx

ZERO_CENTRED_NORM = re.compile(
    r"(^|\.)(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$"
    r"|^model\.norm\.weight$"
    r"|^mtp\.(norm|pre_fc_norm_embedding|pre_fc_norm_hidden)\.weight$"
)
FP32_PARAMS = re.compile(r"\.(A_log|dt_bias)$")
PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
FUSED_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def canonical_name(name: str) -> str:
    """Map any of the real HF prefixes onto this package's parameter names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    return name


def is_zero_centred_norm(name: str) -> bool:
    return ZERO_CENTRED_NORM.search(name) is not None and ".linear_attn." not in name


def keeps_fp32(name: str) -> bool:
    """Tensors held in fp32 whatever the model dtype: tiny, and precision-critical."""
    return FP32_PARAMS.search(name) is not None or is_zero_centred_norm(name)


def shift_norm(w: mx.array) -> mx.array:
    """Zero-centred weight w -> 1 + w in fp32 (1 + small w would lose bits in bf16)."""
    return w.astype(mx.float32) + 1.0


def transform(name: str, w: mx.array) -> mx.array:
    """The per-tensor rules (everything except expert stacking), for a tensor already under its canonical name."""
    if is_zero_centred_norm(name):
        return shift_norm(w)
    if name.endswith("conv1d.weight") and w.ndim == 3 and w.shape[1] == 1:
        return w.swapaxes(1, 2)
    if FP32_PARAMS.search(name):
        return w.astype(mx.float32)
    if name == "visual.patch_embed.proj.weight" and w.ndim == 5 and w.shape[1] == 3:
        return w.transpose(0, 2, 3, 4, 1)  # Conv3d [out, C, T, py, px] -> MLX channels-last [out, T, py, px, C]
    return w


def expert_list(per_expert: dict[int, mx.array], name: str) -> list[mx.array]:
    """{expert index: [out, in]} in expert order, refusing gaps in the expert numbering."""
    missing = sorted(set(range(len(per_expert))) ^ set(per_expert))
    if missing:
        raise ValueError(f"{name}: expert tensors are not numbered 0..{len(per_expert) - 1} (odd ones: {missing[:8]})")
    return [per_expert[e] for e in range(len(per_expert))]


def hf_to_mlx(tensors: Iterable[tuple[str, mx.array]], stacked: bool = True
              ) -> Iterator[tuple[str, mx.array | list[mx.array], list[str]]]:
    """Convert (hf_name, array) pairs; yields (mlx_name, array, source hf names).

    Per-expert tensors are held back until all of a layer's experts have been seen, then stacked; everything else
    is yielded as it comes, so a caller can stream a checkpoint tensor by tensor. With `stacked=False` a per-expert
    group is yielded as its list of per-expert slices ([2I, H] gate-then-up, or [H, I]) instead of one [E, …]
    array, so a converter can transform and write it expert by expert without materialising the stack.
    """
    groups: dict[str, dict[str, dict[int, mx.array]]] = defaultdict(lambda: defaultdict(dict))
    sources: dict[str, list[str]] = defaultdict(list)
    for hf_name, w in tensors:
        name = canonical_name(hf_name)
        if m := PER_EXPERT.match(name):
            groups[m["prefix"]][m["proj"]][int(m["e"])] = w
            sources[m["prefix"]].append(hf_name)
        elif m := FUSED_EXPERT.match(name):
            yield f"{name}.weight", w, [hf_name]
        else:
            yield name, transform(name, w), [hf_name]
    for prefix, projs in groups.items():
        if set(projs) != {"gate_proj", "up_proj", "down_proj"}:
            raise ValueError(f"{prefix}: per-expert tensors incomplete, found only {sorted(projs)}")
        gate = expert_list(projs["gate_proj"], f"{prefix}.*.gate_proj")
        up = expert_list(projs["up_proj"], f"{prefix}.*.up_proj")
        down = expert_list(projs["down_proj"], f"{prefix}.*.down_proj")
        if len(gate) != len(up) or len(gate) != len(down):
            raise ValueError(f"{prefix}: {len(gate)} gate, {len(up)} up and {len(down)} down expert tensors")
        gate_up = [mx.concatenate([g, u], axis=0) for g, u in zip(gate, up)]
        yield f"{prefix}.gate_up_proj.weight", mx.stack(gate_up) if stacked else gate_up, sources[prefix]
        yield f"{prefix}.down_proj.weight", mx.stack(down) if stacked else down, sources[prefix]
