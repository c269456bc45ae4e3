"""The on-disk MLX layout: what `mlx_lm.convert` and `mlx_vlm.convert` write, and what our converter writes.

    language_model.model.*      the text decoder (norms already 1 + w, conv1d already [C, K, 1])
    language_model.lm_head.*
    language_model.model.layers.{i}.mlp.switch_mlp.{gate,up,down}_proj.{weight,scales,biases}
    vision_tower.*              the vision tower (patch embed channels-last [out, T, py, px, C])
    mtp.*                       kept by our converter only (mlx-lm and mlx-vlm drop it)

Writing this layout keeps our checkpoints loadable by mlx-lm (text) and mlx-vlm, and reading it loads the
mlx-community repos. In memory the package fuses each layer's expert gate and up projections into one
`experts.gate_up_proj` (one gathered matmul per token instead of two); on disk they stay separate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import mlx.core as mx

SWITCH = re.compile(r"^(?P<prefix>.*\.mlp)\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<part>\w+)$")
FUSED = re.compile(r"^(?P<prefix>.*\.mlp)\.experts\.(?P<proj>gate_up_proj|down_proj)\.(?P<part>\w+)$")
QUANT_PARTS = ("weight", "scales", "biases")


def is_mlx_layout(names: Iterable[str]) -> bool:
    return any(n.startswith(("language_model.", "vision_tower.")) for n in names)


def module_to_disk(path: str) -> str:
    """Canonical module path (`model.layers.0.mlp.gate`) -> its name on disk (`language_model.model.layers…`)."""
    if path.startswith("model.") or path == "model":
        return "language_model." + path
    if path.startswith("lm_head"):
        return "language_model." + path
    if path.startswith("visual."):
        return "vision_tower." + path[len("visual."):]
    return path


def module_from_disk(path: str) -> str:
    if path.startswith("language_model."):
        return path[len("language_model."):]
    if path.startswith("vision_tower."):
        return "visual." + path[len("vision_tower."):]
    return path


def module_from_disk_quantized(path: str) -> str:
    """A quantization override's module path on disk -> the canonical module it configures."""
    path = module_from_disk(path)
    return re.sub(r"\.switch_mlp\.(gate_proj|up_proj)$", ".experts.gate_up_proj",
                  re.sub(r"\.switch_mlp\.down_proj$", ".experts.down_proj", path))


def to_disk(name: str, w: mx.array | list[mx.array]) -> Iterator[tuple[str, mx.array | list[mx.array]]]:
    """One canonical tensor -> the on-disk tensor(s): fused expert gate/up split back into two.

    `w` may be a list of per-expert slices (the stacked tensor's axis 0), which stays a list.
    """
    if m := FUSED.match(name):
        base = module_to_disk(m["prefix"]) + ".switch_mlp"
        if m["proj"] == "down_proj":
            yield f"{base}.down_proj.{m['part']}", w
            return
        if isinstance(w, list):
            halves = [mx.split(p, 2, axis=0) for p in w]
            gate, up = [h[0] for h in halves], [h[1] for h in halves]
        else:
            gate, up = mx.split(w, 2, axis=1)
        yield f"{base}.gate_proj.{m['part']}", gate
        yield f"{base}.up_proj.{m['part']}", up
        return
    module, part = name.rsplit(".", 1)
    yield f"{module_to_disk(module)}.{part}", w


def from_disk(tensors: Iterable[tuple[str, mx.array]]) -> Iterator[tuple[str, mx.array, list[str]]]:
    """On-disk (name, array) pairs -> canonical (name, array, source names), fusing expert gate and up."""
    pending: dict[str, dict[str, tuple[str, mx.array]]] = {}
    for name, w in tensors:
        if m := SWITCH.match(name):
            canonical = module_from_disk(m["prefix"]) + ".experts"
            if m["proj"] == "down_proj":
                yield f"{canonical}.down_proj.{m['part']}", w, [name]
                continue
            key = f"{canonical}.gate_up_proj.{m['part']}"
            halves = pending.setdefault(key, {})
            halves[m["proj"]] = (name, w)
            if len(halves) == 2:
                del pending[key]
                (g_name, gate), (u_name, up) = halves["gate_proj"], halves["up_proj"]
                yield key, mx.concatenate([gate, up], axis=1), [g_name, u_name]
            continue
        module, part = name.rsplit(".", 1)
        yield f"{module_from_disk(module)}.{part}", w, [name]
    if pending:
        key, halves = next(iter(pending.items()))
        raise ValueError(f"'{next(iter(halves.values()))[0]}' has no matching "
                         f"{'up_proj' if 'gate_proj' in halves else 'gate_proj'} tensor")
