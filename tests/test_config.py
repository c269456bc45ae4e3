"""Every real config.json form parses to the same model description; bad configs name the field."""

from __future__ import annotations

import copy

import pytest

from mlx_qwen36 import ConfigError, ModelConfig

TEXT_35B = {
    "model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "vocab_size": 248320,
    "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "full_attention_interval": 4, "attn_output_gate": True,
    "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144, "tie_word_embeddings": False, "eos_token_id": 248044,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
}
RELEASE_35B = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
               "text_config": TEXT_35B, "vision_config": {"depth": 27, "hidden_size": 1152, "out_hidden_size": 2048},
               "image_token_id": 248056, "video_token_id": 248057}


def dense_27b() -> dict:
    text = {k: v for k, v in TEXT_35B.items() if "expert" not in k}
    text.update(model_type="qwen3_5_text", hidden_size=5120, num_hidden_layers=64, num_attention_heads=24,
                num_key_value_heads=4, linear_num_value_heads=48, intermediate_size=17408)
    return {"model_type": "qwen3_5", "text_config": text, "vision_config": {"out_hidden_size": 5120}}


def test_release_35b():
    cfg = ModelConfig.from_dict(RELEASE_35B)
    t = cfg.text
    assert cfg.model_type == "qwen3_5_moe" and t.is_moe
    assert t.layer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)
    assert [i for i, x in enumerate(t.layer_types) if x == "full_attention"] == list(range(3, 40, 4))
    assert (t.linear_conv_dim, t.linear_value_dim, t.rotary_dim) == (8192, 4096, 64)
    assert t.rope.theta == 1e7 and t.rope.mrope_section == (11, 11, 10)
    assert (t.num_experts, t.num_experts_per_tok, t.mtp_num_hidden_layers) == (256, 8, 1)
    assert cfg.vision is not None and cfg.image_token_id == 248056


def test_release_27b_dense():
    t = ModelConfig.from_dict(dense_27b()).text
    assert not t.is_moe and t.intermediate_size == 17408
    assert (t.linear_conv_dim, t.linear_value_dim) == (10240, 6144)


def test_flat_text_only_config_equals_nested():
    flat = dict(TEXT_35B)
    assert ModelConfig.from_dict(flat).text == ModelConfig.from_dict(RELEASE_35B).text


def test_save_pretrained_form_layer_types_and_no_gate_field():
    text = {k: v for k, v in TEXT_35B.items() if k not in ("full_attention_interval", "attn_output_gate",
                                                           "mtp_num_hidden_layers")}
    text["layer_types"] = ["full_attention" if i % 2 else "linear_attention" for i in range(40)]
    t = ModelConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": text}).text
    assert t.layer_types[1] == "full_attention" and t.layer_types[2] == "linear_attention"
    assert t.attn_output_gate is True and t.mtp_num_hidden_layers == 0


def test_older_top_level_rope_fields():
    text = {k: v for k, v in TEXT_35B.items() if k != "rope_parameters"}
    text.update(rope_theta=5_000_000, partial_rotary_factor=0.5, rope_scaling={"type": "mrope",
                                                                             "mrope_section": [8, 12, 12]})
    t = ModelConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": text}).text
    assert t.rope.theta == 5e6 and t.rotary_dim == 128 and t.rope.mrope_section == (8, 12, 12)
    assert t.rope.rope_type == "default"


def test_yarn_parameters():
    text = copy.deepcopy(TEXT_35B)
    text["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144)
    rope = ModelConfig.from_dict(dict(text)).text.rope
    assert rope.rope_type == "yarn" and rope.factor == 4.0


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llama"), "model_type 'llama' is not supported"),
    (lambda c: c.pop("model_type"), "'model_type' is missing"),
    (lambda c: c["text_config"].pop("hidden_size"), "'text_config.hidden_size' is missing"),
    (lambda c: c["text_config"].pop("num_experts"), "'text_config.num_experts' is missing"),
    (lambda c: c["text_config"].update(layer_types=["linear_attention", "sliding"] * 20), "unknown layer type"),
    (lambda c: c["text_config"].update(layer_types=["linear_attention"] * 3), "layer_types has 3 entries"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="longrope"), "rope_type 'longrope'"),
    (lambda c: c["text_config"].update(linear_num_value_heads=33), "multiple of linear_num_key_heads"),
])
def test_bad_configs_name_the_field(edit, message):
    cfg = copy.deepcopy(RELEASE_35B)
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(cfg, "some/config.json")
