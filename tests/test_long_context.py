"""Long context: YaRN switched on by `max_context` past the native length, equal to transformers with the same
rope parameters; a checkpoint already configured for YaRN unchanged; limits named."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen36 import load_model
from mlx_qwen36.config import YARN_FACTOR, ConfigError, ModelConfig, with_max_context

TEXT = {"model_type": "qwen3_5_moe_text", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "max_position_embeddings": 262144, "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}}


def config(**text) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": dict(TEXT, **text)})


def test_max_context_switches_yarn_on_past_the_native_length():
    native = config()
    assert with_max_context(native, 262144) is native and with_max_context(native, 4096) is native
    long = with_max_context(native, 1_010_000)
    rope = long.text.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", YARN_FACTOR, 262144)
    assert long.text.max_position_embeddings == 4 * 262144
    params = long.raw["text_config"]["rope_parameters"]  # what the prompt cache fingerprints
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0 and params["rope_theta"] == 1e7
    assert native.raw["text_config"]["rope_parameters"]["rope_type"] == "default"  # not changed in place
    with pytest.raises(ConfigError, match="exceeds 1,048,576"):
        with_max_context(native, 2_000_000)
    with pytest.raises(ConfigError, match="positive"):
        with_max_context(native, 0)


def test_a_checkpoint_already_on_yarn_keeps_its_parameters():
    yarn = config(max_position_embeddings=1_010_000, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144, "rope_theta": 1e7})
    assert with_max_context(yarn, 1_000_000) is yarn
    with pytest.raises(ConfigError, match="YaRN"):
        with_max_context(yarn, 1_100_000)


def test_yarn_logits_equal_transformers(tiny, tmp_path):
    """The tiny checkpoint (native 4,096) loaded with max_context 16,384, against transformers given the same
    rope_parameters: equal to 1e-4, and not equal to the native model's (YaRN's attention scaling shows even at
    short positions)."""
    torch = pytest.importorskip("torch", reason="transformers reference not installed")
    from transformers import AutoModelForImageTextToText

    src = tiny["moe"]["hf"]
    ids = tiny["moe"]["golden"]["input_ids"]
    ours = load_model(src, max_context=16384)
    assert ours.config.text.rope.rope_type == "yarn"
    got = np.array(ours(mx.array(ids)))

    hf = tmp_path / "hf-yarn"
    shutil.copytree(src, hf)
    cfg = json.loads((hf / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    native = text["max_position_embeddings"]
    text["rope_parameters"] = dict(text["rope_parameters"], rope_type="yarn", factor=4.0,
                                   original_max_position_embeddings=native)
    text["max_position_embeddings"] = 4 * native
    (hf / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - tiny["moe"]["golden"]["logits_fp32"]).max() > 1e-3


def test_command_lines_take_max_context(chat_dir, capsys):
    import importlib

    from mlx_qwen36 import chat, server

    cli = importlib.import_module("mlx_qwen36.generate")
    for module in (chat, cli, server):
        assert module.parser().parse_args(["--max-context", "300000", *(["-p", "x"] if module is cli else [])]
                                          ).max_context == 300000
    args = ["--model", str(chat_dir), "--prompt", "hi", "--temp", "0", "--max-tokens", "2"]
    assert cli.main([*args, "--max-context", "300000"]) == 0  # YaRN past the native 262,144
    assert "Generation: 2 tokens" in capsys.readouterr().err
    assert cli.main([*args, "--max-context", "2000000"]) == 1
    assert "error: max_context 2,000,000 exceeds 1,048,576" in capsys.readouterr().err
