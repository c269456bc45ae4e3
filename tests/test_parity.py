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


def fixture_mismatch(key: str, committed: np.ndarray, fresh: np.ndarray) -> str | None:
    """Why a committed golden array is not what the reference computes today, or None when it is.

    Token ids must be equal. Logits come from float runs, which differ between machines of the same kind by
    rounding (~1e-6 in fp32, a few ulps in bf16); a stale fixture (another seed, model or rule) moves them by
    orders of magnitude more, so they are compared with a tolerance well above the rounding and far below that.
    """
    if committed.shape != fresh.shape:
        return f"shape {committed.shape} != {fresh.shape}"
    if not np.issubdtype(committed.dtype, np.floating):
        return None if np.array_equal(committed, fresh) else "different token ids"
    scale = max(float(np.abs(fresh).max()), 1.0)
    tol = (2e-2 if "bf16" in key else 1e-5) * scale
    diff = float(np.abs(committed - fresh).max())
    return None if diff <= tol else f"max |difference| {diff:.2e} > {tol:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_committed_fixtures_are_current(tiny, kind):
    """The golden fixtures a torch-less `pytest` relies on are what tests/reference.py builds today."""
    if not tiny["live"]:
        pytest.skip("torch/transformers not installed")
    committed = np.load(FIXTURES / f"{kind}-golden.npz")
    assert set(committed.files) == set(tiny[kind]["golden"])
    for key, value in tiny[kind]["golden"].items():
        problem = fixture_mismatch(key, committed[key], value)
        assert problem is None, f"{kind}-golden.npz:{key} is stale ({problem}): rerun tests/reference.py"


def test_fixture_comparison_tolerates_rounding_and_catches_staleness():
    golden = dict(np.load(FIXTURES / "moe-golden.npz"))
    rng = np.random.default_rng(0)
    for key, value in golden.items():
        assert fixture_mismatch(key, value, value) is None
        if np.issubdtype(value.dtype, np.floating):
            rounding = 1e-6 if "bf16" not in key else 2**-8 * np.abs(value)
            assert fixture_mismatch(key, value, value + rounding * rng.standard_normal(value.shape)) is None, key
            stale = value.copy()
            stale.flat[7] += 0.1 * max(1.0, np.abs(value).max())  # one logit of one position off
            assert fixture_mismatch(key, value, stale) is not None, key
        else:
            stale = value.copy()
            stale.flat[0] += 1
            assert fixture_mismatch(key, value, stale) is not None, key


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
    model = load_model(tiny[kind]["release"], dtype=mx.float32, mtp=True)
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
def test_bf16_logits_match_the_reference_bf16_run(tiny, kind):
    """A bf16 checkpoint run in bf16 against transformers running the same checkpoint in bf16: as close as bf16
    rounding allows (measured: mean |Δ| 1.09-1.11x the reference's own bf16-vs-fp32 distance, logits ~6)."""
    g = tiny[kind]["golden"]
    logits = run(load_model(tiny[kind]["release"]), g["input_ids"])
    ref16, ref32 = g["logits_release_bf16"], g["logits_release_fp32"]
    noise = np.abs(ref16 - ref32).mean()  # what bf16 rounding alone moves the reference's logits by
    assert noise > 0
    assert np.abs(logits - ref16).mean() <= 1.5 * noise
    assert np.abs(logits - ref16).max() <= 0.2 * np.abs(ref32).max()
    assert (logits.argmax(-1) == ref16.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quantized", [False, True])
def test_bf16_models_run_in_bf16(tiny, kind, quantized):
    """Every layer's output, the logits, the KV cache and the conv state of a bf16 model (and of a 4-bit one
    with bf16 scales) are bf16; only the GDN recurrent state is fp32, as in the reference."""
    import mlx.nn as nn

    from mlx_qwen36.cache import GDNCache

    model = load_model(tiny[kind]["release"])
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    ids = mx.array(tiny[kind]["golden"]["input_ids"])
    cache = model.make_cache()
    h = model.model.embed_tokens(ids)
    for i, (layer, c) in enumerate(zip(model.layers, cache)):
        h = layer(h, c)
        assert h.dtype == mx.bfloat16, f"layer {i} output is {h.dtype}"
    assert model(ids[:, :1]).dtype == mx.bfloat16
    for i, c in enumerate(cache):
        want = [mx.bfloat16, mx.float32] if isinstance(c, GDNCache) else [mx.bfloat16, mx.bfloat16]
        assert [a.dtype for a in c.state] == want, f"layer {i} cache"


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


def test_text_only_skips_vision_and_mtp_is_built_only_when_asked(tiny):
    assert "mtp" not in load_model(tiny["moe"]["release"])
    model = load_model(tiny["moe"]["release"], text_only=True, mtp=True)
    assert "visual" not in model
    assert model.mtp.layers[0].mlp.experts.gate_up_proj.weight.shape == (8, 64, 64)


def test_mtp_head_runs(tiny):
    model = load_model(tiny["moe"]["release"], dtype=mx.float32, mtp=True)
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
