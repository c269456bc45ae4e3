"""Parsed `config.json` for Qwen3.6 (`qwen3_5_moe`) and its dense sibling (`qwen3_5`).

Real files come in several shapes: the release nests `text_config` / `vision_config`, text-only exports are flat,
older files keep `rope_theta` / `partial_rotary_factor` / `rope_scaling` at the top of the text config, and
transformers' `save_pretrained` writes `layer_types` but drops `full_attention_interval`, `attn_output_gate` and
the `mtp_*` fields. Every form is normalised here so the model never looks at raw JSON.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

MOE_TYPES = {"qwen3_5_moe", "qwen3_5_moe_text"}
DENSE_TYPES = {"qwen3_5", "qwen3_5_text"}
LAYER_TYPES = {"linear_attention", "full_attention"}


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen3.6 model; the message names the file and the field."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    mrope_interleaved: bool = True
    rope_type: str = "default"
    # YaRN (model card's long-context recipe); unused for rope_type "default".
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclass(frozen=True)
class TextConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    layer_types: tuple[str, ...]
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attn_output_gate: bool = True
    # MoE (35B-A3B); zero experts means the dense SwiGLU MLP of the 27B.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    intermediate_size: int = 0
    mtp_num_hidden_layers: int = 0
    eos_token_id: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: dict[str, Any] | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return parse_config(data, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; this folder is not a model checkpoint") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return parse_config(data, str(path))


YARN_FACTOR = 4.0  # the model card's long-context recipe: rope_type yarn, factor 4 over the native 262,144


def context_reach(config: ModelConfig) -> int:
    """The longest context the checkpoint can be run at: its YaRN's reach, or 4x the native one with YaRN on."""
    text, rope = config.text, config.text.rope
    if rope.rope_type == "yarn":
        return max(text.max_position_embeddings,
                   int(rope.factor * (rope.original_max_position_embeddings or text.max_position_embeddings)))
    return int(YARN_FACTOR * text.max_position_embeddings)


def with_max_context(config: ModelConfig, max_context: int) -> ModelConfig:
    """The config for prompts and replies of up to `max_context` tokens.

    Up to the native `max_position_embeddings` (or a YaRN config's own reach) nothing changes. Beyond the native
    length, rotary switches to YaRN with the model card's factor 4 over the native length (`rope_type: yarn`,
    `factor: 4`, `original_max_position_embeddings: native`), computed as transformers computes it, and the context
    becomes 4x the native one. ConfigError past what factor 4 reaches."""
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise ConfigError(f"max_context must be a positive number of tokens, got {max_context!r}")
    text, rope = config.text, config.text.rope
    if rope.rope_type == "yarn":
        reach = context_reach(config)
        if max_context > reach:
            raise ConfigError(f"max_context {max_context:,} exceeds the {reach:,} tokens this checkpoint's YaRN "
                              f"(factor {rope.factor:g}) reaches")
        return config
    native = text.max_position_embeddings
    if max_context <= native:
        return config
    reach = context_reach(config)
    if max_context > reach:
        raise ConfigError(f"max_context {max_context:,} exceeds {reach:,}: YaRN with the documented factor "
                          f"{YARN_FACTOR:g} extends the native {native:,} tokens that far")
    yarn = {"rope_type": "yarn", "factor": YARN_FACTOR, "original_max_position_embeddings": native}
    raw = copy.deepcopy(config.raw)
    raw_text = raw.get("text_config", raw)
    raw_text["rope_parameters"] = dict(raw_text.get("rope_parameters") or {}, **yarn)
    raw_text["max_position_embeddings"] = reach
    new_rope = replace(rope, rope_type="yarn", factor=YARN_FACTOR, original_max_position_embeddings=native)
    return replace(config, text=replace(text, rope=new_rope, max_position_embeddings=reach), raw=raw)


def _require(cfg: dict[str, Any], key: str, source: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{source}: required field '{where}{key}' is missing")
    return cfg[key]


def _parse_rope(text: dict[str, Any], source: str) -> RopeConfig:
    # Newer files: rope_parameters; older ones: top-level rope_theta/partial_rotary_factor plus rope_scaling.
    params = dict(text.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in text and text[key] is not None:
            params.setdefault(key, text[key])
    params.update(text.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("mrope",):
        rope_type = "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{source}: rope_type '{rope_type}' is not supported (expected 'default' or 'yarn')")
    return RopeConfig(
        theta=float(params.get("rope_theta", 10_000_000.0)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", 0.25)),
        mrope_section=tuple(int(s) for s in params.get("mrope_section", (11, 11, 10))),
        mrope_interleaved=bool(params.get("mrope_interleaved", True)),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        attention_factor=params.get("attention_factor"),
    )


def _parse_layer_types(text: dict[str, Any], n_layers: int, source: str) -> tuple[str, ...]:
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(text.get("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    layer_types = tuple(layer_types)
    if len(layer_types) < n_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
    bad = sorted(set(layer_types) - LAYER_TYPES)
    if bad:
        raise ConfigError(f"{source}: unknown layer type(s) {bad} in layer_types")
    return layer_types[:n_layers]


def parse_config(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Normalise any of the real `config.json` forms into a `ModelConfig`."""
    model_type = data.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: required field 'model_type' is missing")
    if model_type not in MOE_TYPES | DENSE_TYPES:
        raise ConfigError(
            f"{source}: model_type '{model_type}' is not supported "
            f"(expected one of {sorted(MOE_TYPES | DENSE_TYPES)})"
        )
    nested = "text_config" in data
    text = dict(data["text_config"]) if nested else dict(data)
    where = "text_config." if nested else ""
    text_type = text.get("model_type", model_type)
    is_moe = text_type in MOE_TYPES or (not nested and model_type in MOE_TYPES)

    req = {k: _require(text, k, source, where) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    )}
    n_layers = int(req["num_hidden_layers"])
    moe: dict[str, int] = {}
    if is_moe:
        moe = {k: int(_require(text, k, source, where)) for k in (
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
        )}
        if moe["num_experts_per_tok"] > moe["num_experts"]:
            raise ConfigError(f"{source}: num_experts_per_tok > num_experts")
    else:
        moe["intermediate_size"] = int(_require(text, "intermediate_size", source, where))

    eos = text.get("eos_token_id", data.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    head_dim = text.get("head_dim") or req["hidden_size"] // req["num_attention_heads"]
    text_cfg = TextConfig(
        model_type=text_type,
        hidden_size=int(req["hidden_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=int(req["num_attention_heads"]),
        num_key_value_heads=int(req["num_key_value_heads"]),
        head_dim=int(head_dim),
        vocab_size=int(req["vocab_size"]),
        layer_types=_parse_layer_types(text, n_layers, source),
        linear_num_key_heads=int(req["linear_num_key_heads"]),
        linear_num_value_heads=int(req["linear_num_value_heads"]),
        linear_key_head_dim=int(req["linear_key_head_dim"]),
        linear_value_head_dim=int(req["linear_value_head_dim"]),
        linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
        rope=_parse_rope(text, source),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", data.get("tie_word_embeddings", False))),
        attn_output_gate=bool(text.get("attn_output_gate", True)),
        mtp_num_hidden_layers=int(text.get("mtp_num_hidden_layers", 0) or 0),
        eos_token_id=eos_ids,
        **moe,
    )
    if text_cfg.linear_num_value_heads % text_cfg.linear_num_key_heads:
        raise ConfigError(f"{source}: linear_num_value_heads must be a multiple of linear_num_key_heads")
    if text_cfg.num_attention_heads % text_cfg.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    if not text_cfg.attn_output_gate:
        raise ConfigError(f"{source}: attn_output_gate=false is not a Qwen3.6 layout")

    top_model_type = model_type.removesuffix("_text")
    return ModelConfig(
        model_type=top_model_type,
        text=text_cfg,
        vision=dict(data["vision_config"]) if data.get("vision_config") else None,
        image_token_id=int(data.get("image_token_id", 248056)),
        video_token_id=int(data.get("video_token_id", 248057)),
        vision_start_token_id=int(data.get("vision_start_token_id", 248053)),
        vision_end_token_id=int(data.get("vision_end_token_id", 248054)),
        raw=data,
    )
