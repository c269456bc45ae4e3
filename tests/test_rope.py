"""Partial rotary and interleaved M-RoPE equal the reference."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from test_config import TEXT_35B

from mlx_qwen36 import ModelConfig, load_model
from mlx_qwen36.rope import Rotary, mrope_axis


def text_config(**rope):
    text = copy.deepcopy(TEXT_35B)
    text["rope_parameters"].update(rope)
    return ModelConfig.from_dict(text).text


def test_mrope_axis_assignment_is_interleaved():
    axis = mrope_axis(text_config())
    assert [i for i in range(32) if axis[i] == 0] == list(range(0, 32, 3))
    assert [i for i in range(32) if axis[i] == 1] == list(range(1, 32, 3))
    assert [i for i in range(32) if axis[i] == 2] == list(range(2, 30, 3))


def test_equal_axes_reduce_to_1d_rope():
    rot = Rotary(text_config())
    x = mx.random.normal((2, 3, 7, 256))
    pos = mx.broadcast_to(mx.arange(5, 12)[None, None], (3, 2, 7))
    assert mx.abs(rot(x, offset=5) - rot(x, position_ids=pos)).max().item() < 1e-5


def test_dims_past_the_rotary_part_pass_through():
    rot = Rotary(text_config())
    x = mx.random.normal((1, 1, 4, 256))
    assert mx.array_equal(rot(x, offset=3)[..., 64:], x[..., 64:])


def reference_rotary(cfg_dict):
    pytest.importorskip("torch", reason="transformers reference not installed")
    transformers = pytest.importorskip("transformers", reason="transformers reference not installed")
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

    return Qwen3_5MoeTextRotaryEmbedding(transformers.Qwen3_5MoeTextConfig(**cfg_dict))


def test_3d_positions_match_reference():
    import_torch = pytest.importorskip("torch", reason="transformers reference not installed")
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import apply_rotary_pos_emb

    emb = reference_rotary(TEXT_35B)
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 300, size=(3, 2, 9))
    x = rng.standard_normal((2, 4, 9, 256)).astype(np.float32)
    cos, sin = emb(import_torch.from_numpy(x), import_torch.from_numpy(pos))
    ref, _ = apply_rotary_pos_emb(import_torch.from_numpy(x), import_torch.from_numpy(x), cos, sin)
    ours = Rotary(text_config())(mx.array(x), position_ids=mx.array(pos))
    assert np.abs(np.array(ours) - ref.numpy()).max() < 1e-4


def test_yarn_frequencies_match_reference():
    torch = pytest.importorskip("torch", reason="transformers reference not installed")
    cfg = copy.deepcopy(TEXT_35B)
    cfg["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144)
    cfg["max_position_embeddings"] = 1_010_000
    emb = reference_rotary(cfg)
    pos = np.arange(3000, 3100)[None].repeat(3, 0)[:, None]
    x = np.ones((1, 1, pos.shape[-1], 256), dtype=np.float32)
    cos, sin = emb(torch.from_numpy(x), torch.from_numpy(pos))
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import apply_rotary_pos_emb

    ref, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)
    ours = Rotary(ModelConfig.from_dict(cfg).text)(mx.array(x), offset=3000)
    assert np.abs(np.array(ours) - ref.numpy()).max() < 1e-3


def test_model_accepts_3d_position_ids(tiny):
    g = tiny["moe"]["golden"]
    model = load_model(tiny["moe"]["hf"])
    ids = mx.array(g["input_ids"])
    pos = mx.broadcast_to(mx.arange(ids.shape[1])[None, None], (3, 2, ids.shape[1]))
    assert np.abs(np.array(model(ids, position_ids=pos)) - g["logits_fp32"]).max() <= 1e-4
