"""Each model and conversion rule: a unit test of the rule, and a check that breaking it breaks parity.

The second kind shows the tiny models are random enough (norms, dt_bias, A_log, heads) that the parity tests would
catch a regression in that rule.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_qwen36.attention as attention
import mlx_qwen36.convert.hf as hf
import mlx_qwen36.ops.gated_delta as gated_delta
from mlx_qwen36 import load_model


def max_error(tiny, kind: str = "moe") -> float:
    g = tiny[kind]["golden"]
    logits = load_model(tiny[kind]["hf"])(mx.array(g["input_ids"]))
    return float(np.abs(np.array(logits) - g["logits_fp32"]).max())


def test_parity_holds_unbroken(tiny):
    assert max_error(tiny) <= 1e-4


# --- norm shift -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "model.layers.0.input_layernorm.weight", "model.layers.3.post_attention_layernorm.weight",
    "model.layers.3.self_attn.q_norm.weight", "model.layers.3.self_attn.k_norm.weight", "model.norm.weight",
    "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
    "mtp.layers.0.input_layernorm.weight", "mtp.layers.0.self_attn.q_norm.weight",
])
def test_zero_centred_norms_are_shifted_in_fp32(name):
    w = mx.array([0.0, 0.5, -0.25], dtype=mx.bfloat16)
    out = hf.transform(name, w)
    assert out.dtype == mx.float32
    assert np.array(out).tolist() == [1.0, 1.5, 0.75]


@pytest.mark.parametrize("name", ["model.layers.0.linear_attn.norm.weight", "visual.blocks.0.norm1.weight",
                                  "visual.merger.norm.weight"])
def test_plain_norms_are_not_shifted(name):
    w = mx.array([1.0, 0.5], dtype=mx.bfloat16)
    out = hf.transform(name, w)
    assert out.dtype == mx.bfloat16 and np.array(out.astype(mx.float32)).tolist() == [1.0, 0.5]


def test_missing_norm_shift_breaks_parity(tiny, monkeypatch):
    monkeypatch.setattr(hf, "shift_norm", lambda w: w.astype(mx.float32))
    assert max_error(tiny) > 1e-2


def test_shifting_the_gdn_norm_breaks_parity(tiny, monkeypatch):
    monkeypatch.setattr(hf, "is_zero_centred_norm", lambda name: hf.ZERO_CENTRED_NORM.search(name) is not None
                        or name.endswith("linear_attn.norm.weight"))
    assert max_error(tiny) > 1e-2


# --- conv1d layout ----------------------------------------------------------------------------------------------

def test_conv1d_layout():
    w = mx.arange(2 * 4).reshape(2, 1, 4)  # HF [C, 1, K]
    out = hf.transform("model.layers.0.linear_attn.conv1d.weight", w)
    assert out.shape == (2, 4, 1)
    assert np.array(out[1, :, 0]).tolist() == [4, 5, 6, 7]


def test_reversed_conv_taps_break_parity(tiny, monkeypatch):
    original = hf.transform
    monkeypatch.setattr(hf, "transform", lambda name, w: original(name, w)[:, ::-1] if name.endswith("conv1d.weight")
                        else original(name, w))
    assert max_error(tiny) > 1e-2


# --- experts ----------------------------------------------------------------------------------------------------

def test_per_expert_tensors_stack_gate_rows_first():
    p = "model.layers.0.mlp.experts"
    tensors = []
    for e in range(3):
        tensors += [(f"{p}.{e}.gate_proj.weight", mx.full((2, 4), float(e))),
                    (f"{p}.{e}.up_proj.weight", mx.full((2, 4), 10.0 + e)),
                    (f"{p}.{e}.down_proj.weight", mx.full((4, 2), 20.0 + e))]
    out = {n: w for n, w, _ in hf.hf_to_mlx(tensors)}
    gate_up, down = out[f"{p}.gate_up_proj.weight"], out[f"{p}.down_proj.weight"]
    assert gate_up.shape == (3, 4, 4) and down.shape == (3, 4, 2)
    assert np.array(gate_up[:, :2, 0]).tolist() == [[0, 0], [1, 1], [2, 2]]
    assert np.array(gate_up[:, 2:, 0]).tolist() == [[10, 10], [11, 11], [12, 12]]
    assert np.array(down[:, 0, 0]).tolist() == [20, 21, 22]


def test_fused_experts_keep_their_layout():
    gate_up = mx.random.normal((3, 4, 5))
    out = dict((n, w) for n, w, _ in hf.hf_to_mlx([("model.language_model.layers.1.mlp.experts.gate_up_proj",
                                                    gate_up)]))
    assert mx.array_equal(out["model.layers.1.mlp.experts.gate_up_proj.weight"], gate_up)


def test_expert_numbering_gaps_are_refused():
    p = "model.layers.0.mlp.experts"
    tensors = [(f"{p}.{e}.{proj}.weight", mx.zeros((2, 2))) for e in (0, 2) for proj in ("gate_proj", "up_proj",
                                                                                          "down_proj")]
    with pytest.raises(ValueError, match="not numbered"):
        list(hf.hf_to_mlx(tensors))


def test_swapped_gate_and_up_break_parity(tiny, monkeypatch):
    original = hf.hf_to_mlx

    def swapped(tensors):
        for name, w, src in original(tensors):
            if name.endswith("gate_up_proj.weight"):
                w = mx.concatenate(mx.split(w, 2, axis=1)[::-1], axis=1)
            yield name, w, src

    monkeypatch.setattr(hf, "hf_to_mlx", swapped)
    monkeypatch.setattr("mlx_qwen36.loader.hf_to_mlx", swapped)
    assert max_error(tiny) > 1e-2


# --- attention: q/gate interleave, GDN: head expansion ----------------------------------------------------------

def test_query_gate_split_is_per_head():
    D = 2
    qg = mx.arange(2 * 2 * D).reshape(1, 1, -1)  # rows: q0 q0 g0 g0 q1 q1 g1 g1
    q, gate = attention.split_query_gate(qg, D)
    assert np.array(q).reshape(-1).tolist() == [0, 1, 4, 5]
    assert np.array(gate).reshape(-1).tolist() == [2, 3, 6, 7]


def test_half_split_of_q_proj_breaks_parity(tiny, monkeypatch):
    def half_split(qg, head_dim):
        B, T, _ = qg.shape
        q, g = mx.split(qg, 2, axis=-1)
        return q.reshape(B, T, -1, head_dim), g.reshape(B, T, -1, head_dim)

    monkeypatch.setattr(attention, "split_query_gate", half_split)
    assert max_error(tiny) > 1e-2


def test_heads_are_repeat_interleaved():
    x = mx.array([10, 20]).reshape(1, 1, 2, 1)
    assert np.array(gated_delta.expand_heads(x, 2)).reshape(-1).tolist() == [10, 10, 20, 20]


def test_tiled_heads_break_parity(tiny, monkeypatch):
    monkeypatch.setattr(gated_delta, "expand_heads", lambda x, groups: mx.tile(x, (1, 1, groups, 1)))
    assert max_error(tiny) > 1e-2


# --- GDN scalars --------------------------------------------------------------------------------------------------

def test_a_log_and_dt_bias_stay_fp32():
    for name in ("model.layers.0.linear_attn.A_log", "mtp.layers.0.linear_attn.dt_bias"):
        assert hf.transform(name, mx.zeros(3, dtype=mx.bfloat16)).dtype == mx.float32
        assert hf.keeps_fp32(name)


def test_wrong_decay_sign_breaks_parity(tiny, monkeypatch):
    original = gated_delta.gated_delta_recurrence
    monkeypatch.setattr(gated_delta, "gated_delta_recurrence",
                        lambda q, k, v, g, beta, state: original(q, k, v, -g * 0.1, beta, state))
    assert max_error(tiny) > 1e-2


@pytest.mark.parametrize("hf_name, name", [
    ("model.language_model.layers.2.mlp.gate.weight", "model.layers.2.mlp.gate.weight"),
    ("model.layers.2.mlp.gate.weight", "model.layers.2.mlp.gate.weight"),
    ("model.visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("mtp.fc.weight", "mtp.fc.weight"),
])
def test_prefixes(hf_name, name):
    assert hf.canonical_name(hf_name) == name
