"""Random-weight Qwen3.6 checkpoints in the released HF layout, written tensor by tensor.

The real weights can never be downloaded on CI machines, yet memory and speed have to be measured at real layer
sizes: this writes a checkpoint with the release's tensor names, fused expert layout, sharding and nested config,
holding at most one shard in memory. Used by the loading-memory measurement, the converter and the benchmark.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

PRESETS: dict[str, dict[str, Any]] = {
    # One block of Qwen3.6-35B-A3B at its real sizes: 3 GDN layers + 1 gated attention, 256 experts top-8.
    "one-block": {
        "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16,
        "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "num_experts": 256, "num_experts_per_tok": 8,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
    },
    "tiny": {
        "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    },
}


VISION_PRESETS: dict[str, dict[str, Any]] = {
    "real": {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
             "num_position_embeddings": 2304},
    "tiny": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "num_position_embeddings": 64},
}


def vision_config(preset: str, out_hidden_size: int) -> dict[str, Any]:
    """A vision_config for a preset ("real" is the released tower), projecting to the text hidden size."""
    return {"model_type": "qwen3_5_moe_vision", "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
            "in_channels": 3, "hidden_act": "gelu_pytorch_tanh", "out_hidden_size": out_hidden_size,
            "deepstack_visual_indexes": [], **VISION_PRESETS[preset]}


def vision_shapes(v: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The tower's tensors as the release names them (`model.visual.*`)."""
    h, inter, p, t = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"]
    merged = h * v["spatial_merge_size"] ** 2
    yield "model.visual.patch_embed.proj.weight", (h, v["in_channels"], t, p, p)
    yield "model.visual.patch_embed.proj.bias", (h,)
    yield "model.visual.pos_embed.weight", (v["num_position_embeddings"], h)
    for i in range(v["depth"]):
        b = f"model.visual.blocks.{i}."
        for n in ("norm1", "norm2"):
            yield f"{b}{n}.weight", (h,)
            yield f"{b}{n}.bias", (h,)
        for n, shape in (("attn.qkv", (3 * h, h)), ("attn.proj", (h, h)), ("mlp.linear_fc1", (inter, h)),
                         ("mlp.linear_fc2", (h, inter))):
            yield f"{b}{n}.weight", shape
            yield f"{b}{n}.bias", (shape[0],)
    yield "model.visual.merger.norm.weight", (h,)
    yield "model.visual.merger.norm.bias", (h,)
    yield "model.visual.merger.linear_fc1.weight", (merged, merged)
    yield "model.visual.merger.linear_fc1.bias", (merged,)
    yield "model.visual.merger.linear_fc2.weight", (v["out_hidden_size"], merged)
    yield "model.visual.merger.linear_fc2.bias", (v["out_hidden_size"],)


def text_config(preset: str = "one-block", **overrides: Any) -> dict[str, Any]:
    """A release-style text_config for a preset, with any field overridden (e.g. num_experts=64)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (choose from {sorted(PRESETS)})")
    cfg = {
        "model_type": "qwen3_5_moe_text", "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144, "full_attention_interval": 4, "attn_output_gate": True,
        "tie_word_embeddings": False, "mtp_num_hidden_layers": 0, "eos_token_id": 248044,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    }
    cfg.update(PRESETS[preset])
    cfg.update(overrides)
    if not cfg.get("num_experts"):
        cfg["model_type"] = "qwen3_5_text"
        cfg.setdefault("intermediate_size", 4 * cfg["hidden_size"])
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            cfg.pop(key, None)
    return cfg


def tensor_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the released text checkpoint (plus the MTP layer when configured), in file order."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    key_dim = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    value_dim = cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    Hv, K = cfg["linear_num_value_heads"], cfg["linear_conv_kernel_dim"]
    interval = cfg["full_attention_interval"]

    def attention(p: str) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield f"{p}self_attn.q_proj.weight", (2 * nh * hd, H)
        yield f"{p}self_attn.k_proj.weight", (nkv * hd, H)
        yield f"{p}self_attn.v_proj.weight", (nkv * hd, H)
        yield f"{p}self_attn.o_proj.weight", (H, nh * hd)
        yield f"{p}self_attn.q_norm.weight", (hd,)
        yield f"{p}self_attn.k_norm.weight", (hd,)

    def ffn(p: str, per_expert: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
        if not cfg.get("num_experts"):
            inter = cfg["intermediate_size"]
            yield f"{p}mlp.gate_proj.weight", (inter, H)
            yield f"{p}mlp.up_proj.weight", (inter, H)
            yield f"{p}mlp.down_proj.weight", (H, inter)
            return
        E, inter, shared = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
        yield f"{p}mlp.gate.weight", (E, H)
        if per_expert:
            for e in range(E):
                yield f"{p}mlp.experts.{e}.gate_proj.weight", (inter, H)
                yield f"{p}mlp.experts.{e}.up_proj.weight", (inter, H)
                yield f"{p}mlp.experts.{e}.down_proj.weight", (H, inter)
        else:
            yield f"{p}mlp.experts.gate_up_proj", (E, 2 * inter, H)
            yield f"{p}mlp.experts.down_proj", (E, H, inter)
        yield f"{p}mlp.shared_expert.gate_proj.weight", (shared, H)
        yield f"{p}mlp.shared_expert.up_proj.weight", (shared, H)
        yield f"{p}mlp.shared_expert.down_proj.weight", (H, shared)
        yield f"{p}mlp.shared_expert_gate.weight", (1, H)

    yield "model.language_model.embed_tokens.weight", (V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}."
        yield f"{p}input_layernorm.weight", (H,)
        yield f"{p}post_attention_layernorm.weight", (H,)
        if (i + 1) % interval:
            yield f"{p}linear_attn.in_proj_qkv.weight", (2 * key_dim + value_dim, H)
            yield f"{p}linear_attn.in_proj_z.weight", (value_dim, H)
            yield f"{p}linear_attn.in_proj_b.weight", (Hv, H)
            yield f"{p}linear_attn.in_proj_a.weight", (Hv, H)
            yield f"{p}linear_attn.conv1d.weight", (2 * key_dim + value_dim, 1, K)
            yield f"{p}linear_attn.dt_bias", (Hv,)
            yield f"{p}linear_attn.A_log", (Hv,)
            yield f"{p}linear_attn.norm.weight", (cfg["linear_value_head_dim"],)
            yield f"{p}linear_attn.out_proj.weight", (H, value_dim)
        else:
            yield from attention(p)
        yield from ffn(p, per_expert=False)
    yield "model.language_model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)
    for j in range(cfg.get("mtp_num_hidden_layers", 0)):
        yield "mtp.fc.weight", (H, 2 * H)
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            yield f"mtp.{n}.weight", (H,)
        p = f"mtp.layers.{j}."
        yield f"{p}input_layernorm.weight", (H,)
        yield f"{p}post_attention_layernorm.weight", (H,)
        yield from attention(p)
        yield from ffn(p, per_expert=True)


def random_tensor(name: str, shape: tuple[int, ...], dtype: mx.Dtype, scale: float = 1.0) -> mx.array:
    if name.startswith("model.visual.") and name.endswith((".bias", "norm1.weight", "norm2.weight", "norm.weight")):
        base = 1.0 if name.endswith("weight") else 0.0  # LayerNorms: weight ~1, biases ~0
        return (base + 0.02 * mx.random.normal(shape)).astype(dtype)
    if name.endswith("A_log"):
        return mx.log(mx.random.uniform(1.0, 16.0, shape)).astype(dtype)
    if name.endswith(("norm.weight", "dt_bias")):
        base = 1.0 if name.endswith("linear_attn.norm.weight") or name.endswith("dt_bias") else 0.0
        return (base + 0.1 * mx.random.normal(shape)).astype(dtype)
    fan_in = shape[-1]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        scale = 1.0
    return (mx.random.normal(shape) * scale * fan_in**-0.5).astype(dtype)


def write_checkpoint(out: str | Path, cfg: dict[str, Any], dtype: mx.Dtype = mx.bfloat16,
                     shard_bytes: int = 2 << 30, seed: int = 0, weight_scale: float = 1.0,
                     predictable: bool = False, vision: dict[str, Any] | None = None) -> Path:
    """Write config.json, sharded safetensors and the index; returns the folder.

    `vision` (a `vision_config`) adds the vision tower's tensors and config. `weight_scale` < 1 shrinks the layers'
    matmul weights relative to the residual stream: random networks at full scale are chaotic (bf16 rounding alone
    flips a quarter of their top-1 tokens), which says nothing about how a trained model tolerates quantization;
    damped ones behave more like trained ones. `predictable` makes lm_head the embedding shifted by one row, so
    token t strongly predicts t+1: next-token distributions are then peaked like a trained model's, and greedy
    decoding has margins that quantization noise should not flip.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    embed = None
    for name, shape in itertools.chain(tensor_shapes(cfg), vision_shapes(vision) if vision else ()):
        if predictable and name == "lm_head.weight":
            t = mx.roll(embed, 1, axis=0) * cfg["hidden_size"] ** -0.5
        elif predictable and name.endswith("embed_tokens.weight"):
            t = embed = mx.random.normal(shape).astype(dtype)  # unit rms: the residual stream carries the token
        else:
            t = random_tensor(name, shape, dtype, weight_scale)
        mx.eval(t)
        if size and size + t.nbytes > shard_bytes:
            _flush(out, shards)
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    _flush(out, shards, last=True)
    n = len(shards)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        old, new = out / f"shard-{i}.safetensors", out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        old.rename(new)
        for name, nbytes in names.items():
            weight_map[name] = new.name
            total += nbytes
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config = {"model_type": "qwen3_5_moe" if cfg.get("num_experts") else "qwen3_5", "text_config": cfg,
              **({"vision_config": vision} if vision else {}),
              "architectures": ["Qwen3_5MoeForConditionalGeneration" if cfg.get("num_experts")
                                else "Qwen3_5ForConditionalGeneration"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _flush(out: Path, shards: list[dict], last: bool = False) -> None:
    """Write the open shard and keep only its tensor sizes, so at most one shard is in memory."""
    i = len(shards) - 1
    mx.save_safetensors(str(out / f"shard-{i}.safetensors"), shards[i], metadata={"format": "pt"})
    shards[i] = {k: v.nbytes for k, v in shards[i].items()}
    mx.clear_cache()
    if not last:
        shards.append({})
