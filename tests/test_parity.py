"""MLX logits equal the transformers reference on tiny random models in the real checkpoint layouts."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, KINDS

from mlx_qwen36 import load_model

FP32_TOL = 1e-4


def run(model, ids: np.ndarray, cache=None) -> np.ndarray:
    out = model(mx.array(ids), cache=cache)
    return np.array(out.astype(mx.float32))


def test_reference_runs_live(tiny):
    if not tiny["live"]:
        pytest.skip("torch/transformers not installed: parity is checked against the committed golden fixtures only")
    assert tiny["moe"]["golden"]["logits_fp32"].shape == (2, 12, 512)


@pytest.mark.parametrize("kind", KINDS)
def test_committed_fixtures_are_current(tiny, kind):
    """The golden fixtures a torch-less `pytest` relies on are what tests/reference.py builds today."""
    if not tiny["live"]:
        pytest.skip("torch/transformers not installed")
    committed = np.load(FIXTURES / f"{kind}-golden.npz")
    for key, value in tiny[kind]["golden"].items():
        assert np.array_equal(committed[key], value), f"{kind}-golden.npz:{key} is stale: rerun tests/reference.py"


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_logits_match_reference(tiny, kind):
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["hf"])
    assert model.model.embed_tokens.weight.dtype == mx.float32
    logits = run(model, g["input_ids"])
    assert logits.shape == (2, 12, 512)
    assert np.abs(g["logits_fp32"]).max() > 1.0, "reference logits too small to make 1e-4 meaningful"
    assert np.abs(logits - g["logits_fp32"]).max() <= FP32_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_release_layout_upcast_matches_reference(tiny, kind):
    """Sharded bf16 release layout (fused experts, nested release config, mtp.*), run in fp32."""
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["release"], dtype=mx.float32)
    assert "mtp" in model
    assert np.abs(run(model, g["input_ids"]) - g["logits_release_fp32"]).max() <= FP32_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_top1_agreement(tiny, kind):
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["release"])
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.model.layers[0].linear_attn.A_log.dtype == mx.float32
    assert model.model.layers[0].linear_attn.dt_bias.dtype == mx.float32
    logits = run(model, g["input_ids"])
    # Random tiny models are bf16-noisy (transformers' own bf16 run agrees with its fp32 run on ~90% of
    # positions); a broken rule drops agreement to chance (1/512).
    agree = (logits.argmax(-1) == g["logits_release_fp32"].argmax(-1)).mean()
    assert agree >= 0.8


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_equals_full_forward(tiny, kind):
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["hf"])
    ids = g["input_ids"]
    cache = model.make_cache()
    steps = [run(model, ids[:, t : t + 1], cache) for t in range(ids.shape[1])]
    assert np.abs(np.concatenate(steps, axis=1) - g["logits_fp32"]).max() <= FP32_TOL
    assert all(c.offset == ids.shape[1] for c in cache)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [5, 7])
def test_chunked_prefill_then_decode(tiny, kind, chunk):
    """Chunk sizes that do not divide T; then decode continues from the chunked cache."""
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["hf"])
    ids = g["input_ids"]
    cache = model.make_cache()
    last = np.array(model.prefill(mx.array(ids[:, :10]), cache, chunk_size=chunk))
    assert np.abs(last - g["logits_fp32"][:, 9]).max() <= FP32_TOL
    rest = run(model, ids[:, 10:], cache)
    assert np.abs(rest - g["logits_fp32"][:, 10:]).max() <= FP32_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_are_independent(tiny, kind):
    g = tiny[kind]["golden"]
    model = load_model(tiny[kind]["hf"])
    batch = run(model, g["input_ids"])
    for b in range(2):
        single = run(model, g["input_ids"][b : b + 1])
        assert np.abs(single[0] - batch[b]).max() <= FP32_TOL


def test_text_only_prefix_layout(tiny, tmp_path):
    """`*ForCausalLM` checkpoints name tensors `model.layers…` without `language_model.` and have no visual."""
    from safetensors.numpy import load_file, save_file

    src = tiny["moe"]["hf"]
    tensors = load_file(src / "model.safetensors")
    renamed = {k.replace("model.language_model.", "model."): v for k, v in tensors.items()
               if not k.startswith("model.visual.")}
    assert len(renamed) < len(tensors)
    save_file(renamed, tmp_path / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    flat = dict(config["text_config"])
    flat["model_type"] = "qwen3_5_moe_text"
    (tmp_path / "config.json").write_text(json.dumps(flat))
    g = tiny["moe"]["golden"]
    assert np.abs(run(load_model(tmp_path), g["input_ids"]) - g["logits_fp32"]).max() <= FP32_TOL


def test_text_only_skips_vision_and_keeps_mtp(tiny):
    model = load_model(tiny["moe"]["release"], text_only=True)
    assert "visual" not in model
    assert model.mtp.layers[0].mlp.experts.gate_up_proj.weight.shape == (8, 64, 64)


def test_mtp_head_runs(tiny):
    model = load_model(tiny["moe"]["release"], dtype=mx.float32)
    ids = mx.array(tiny["moe"]["golden"]["input_ids"])
    hidden = model.model(ids)
    draft = model.logits(model.mtp(hidden[:, :-1], model.model.embed_tokens(ids[:, 1:]), model.mtp.make_cache()))
    assert draft.shape == (2, 11, 512)
    assert np.isfinite(np.array(draft)).all()


def test_load_keeps_dtype_unless_asked(tiny):
    assert load_model(tiny["dense"]["hf"]).lm_head.weight.dtype == mx.float32
    model = load_model(tiny["dense"]["hf"], dtype="bfloat16")
    assert model.lm_head.weight.dtype == mx.bfloat16
    assert model.model.norm.weight.dtype == mx.float32
    with pytest.raises(ValueError, match="not an MLX dtype"):
        load_model(tiny["dense"]["hf"], dtype="float64x")
