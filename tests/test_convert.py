"""The converter: recipes and their rules, fidelity, the output folder, and all-or-nothing safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_qwen36.convert.converter as converter
from mlx_qwen36 import CheckpointError, load_model, synthetic
from mlx_qwen36.convert import ConversionError, convert
from mlx_qwen36.convert.__main__ import main as cli
from mlx_qwen36.moe import QuantizedSwitchLinear

PROMPTS = [list(range(5, 25)), [7, 100, 3, 45, 250, 11, 12, 13, 300, 2, 4]]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("MLX_QWEN36_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny bf16 release-layout checkpoint (fused experts, per-expert MTP, shards) whose next-token
    distributions are peaked like a trained model's (see synthetic.write_checkpoint)."""
    out = tmp_path_factory.mktemp("src") / "qwen36-tiny"
    synthetic.write_checkpoint(out, synthetic.text_config("tiny", mtp_num_hidden_layers=1), weight_scale=0.5,
                               predictable=True, shard_bytes=200_000)
    for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        (out / name).write_text("{}" if name.endswith(".json") else "{{ messages }}")
    return out


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("converted")
    variants = {"bf16": {}, "q8": {"quantize": True, "bits": 8}, "q4": {"quantize": True, "bits": 4},
                "mixed": {"quantize": True, "bits": 4, "recipe": "mixed"}}
    return {name: convert(source, base / name, **kw).path for name, kw in variants.items()}


def greedy(model, prompt: list[int], n: int = 16) -> list[int]:
    cache, out = model.make_cache(), []
    x = mx.array([prompt])
    for _ in range(n):
        token = int(mx.argmax(model(x, cache=cache)[0, -1]).item())
        out.append(token)
        x = mx.array([[token]])
    return out


def log_probs(model, prompt: list[int]) -> np.ndarray:
    logits = np.array(model(mx.array([prompt])).astype(mx.float32))[0]
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


def test_unquantized_conversion_is_exact(source, converted):
    ref, out = load_model(source), load_model(converted["bf16"])
    for prompt in PROMPTS:
        assert mx.array_equal(ref(mx.array([prompt])), out(mx.array([prompt])))


def test_8bit_generates_the_same_greedy_tokens(source, converted):
    ref, q8 = load_model(source), load_model(converted["q8"])
    for prompt in PROMPTS:
        assert greedy(q8, prompt) == greedy(ref, prompt)


def test_fidelity_orders_with_bits(source, converted):
    ref = load_model(source)
    div = {name: np.mean([kl(log_probs(ref, p), log_probs(load_model(path), p)) for p in PROMPTS])
           for name, path in converted.items()}
    assert div["bf16"] < 1e-6
    assert div["q8"] < 0.005 and div["mixed"] < 0.005
    assert div["q4"] < 0.05
    assert div["q8"] < div["q4"] and div["mixed"] < div["q4"]


def test_quantization_rules(converted):
    cfg = json.loads((converted["q4"] / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 64, "affine")
    assert q == cfg["quantization_config"]
    router = q["language_model.model.layers.0.mlp.gate"]
    assert router == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["language_model.model.layers.0.mlp.shared_expert_gate"]["bits"] == 8
    assert q["mtp.layers.0.mlp.gate"]["bits"] == 8

    model = load_model(converted["q4"], mtp=True)
    layer = model.model.layers[0]
    assert layer.mlp.gate.bits == 8 and layer.mlp.shared_expert_gate.bits == 8
    assert isinstance(layer.mlp.experts.gate_up_proj, QuantizedSwitchLinear)
    assert layer.mlp.experts.gate_up_proj.bits == 4
    assert layer.linear_attn.in_proj_qkv.bits == 4
    assert model.mtp.layers[0].mlp.experts.gate_up_proj.bits == 4
    assert not hasattr(model.mtp.layers[0].mlp.experts.down_proj, "scales")  # input dim 32 < group 64
    # Never quantized, and kept in fp32 where precision matters.
    assert layer.linear_attn.A_log.dtype == mx.float32 and layer.linear_attn.dt_bias.dtype == mx.float32
    assert layer.input_layernorm.weight.dtype == mx.float32
    assert layer.linear_attn.conv1d.weight.dtype == mx.bfloat16 and not hasattr(layer.linear_attn.conv1d, "scales")


def test_mixed_recipe_keeps_non_experts_at_8_bits(converted):
    model = load_model(converted["mixed"])
    layer, attn = model.model.layers[0], model.model.layers[3]
    assert layer.mlp.experts.gate_up_proj.bits == 4
    assert layer.linear_attn.in_proj_qkv.bits == 8 and attn.self_attn.q_proj.bits == 8
    assert layer.mlp.shared_expert.up_proj.bits == 8 and model.lm_head.bits == 8
    sizes = {n: sum(f.stat().st_size for f in p.glob("*.safetensors")) for n, p in converted.items()}
    assert sizes["q4"] < sizes["mixed"] < sizes["q8"] < sizes["bf16"]


def test_indivisible_input_dims_stay_unquantized(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.text_config("tiny", hidden_size=96, head_dim=32))
    model = load_model(convert(src, tmp_path / "out", quantize=True, group_size=64).path)
    layer = model.model.layers[0]
    assert not hasattr(layer.linear_attn.in_proj_qkv, "scales")  # input dim 96
    assert layer.linear_attn.out_proj.bits == 4  # input dim 64 (value heads x dims)


def test_output_folder(source, converted):
    out = converted["q4"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert "mtp.fc.weight" in index["weight_map"]
    assert "language_model.model.layers.0.mlp.switch_mlp.gate_proj.scales" in index["weight_map"]
    for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja", "README.md"):
        assert (out / name).is_file(), name
    assert "4-bit affine" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["mlx_qwen36"]["mtp"] is True


def test_small_shards(source, tmp_path):
    out = convert(source, tmp_path / "out", shard_bytes=300_000).path
    assert len(list(out.glob("*.safetensors"))) > 2
    assert mx.array_equal(load_model(out)(mx.array([PROMPTS[0]])), load_model(source)(mx.array([PROMPTS[0]])))


def test_drop_mtp(source, tmp_path):
    out = convert(source, tmp_path / "out", drop_mtp=True).path
    assert "mtp" not in load_model(out)
    with pytest.raises(CheckpointError, match="no MTP head"):
        load_model(out, mtp=True)


def test_float16_dtype(source, tmp_path):
    model = load_model(convert(source, tmp_path / "out", dtype="float16").path)
    assert model.lm_head.weight.dtype == mx.float16 and model.model.layers[0].linear_attn.A_log.dtype == mx.float32


# --- safety -----------------------------------------------------------------------------------------------------

def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_refuses_non_empty_target_without_force(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists and is not empty; pass --force"):
        convert(source, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(source, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_refuses_output_inside_input(source, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(source, copy)
    with pytest.raises(ConversionError, match="inside the input checkpoint"):
        convert(copy, copy / "mlx")


@pytest.mark.parametrize("error, message", [
    (KeyboardInterrupt(), "interrupted; nothing was written"),
    (OSError(28, "No space left on device"), "the disk is full"),
    (RuntimeError("boom"), "boom"),
])
def test_failure_mid_write_leaves_nothing(source, tmp_path, monkeypatch, error, message):
    real = converter.write_safetensors

    def failing(path, tensors, **kw):
        real(path, tensors[:3], **kw)  # a partial shard is on disk when the failure hits
        raise error

    monkeypatch.setattr(converter, "write_safetensors", failing)
    out = tmp_path / "out"
    with pytest.raises((ConversionError, RuntimeError), match=message):
        convert(source, out, quantize=True, shard_bytes=100_000)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_failure_keeps_an_existing_target(source, tmp_path, monkeypatch):
    out = convert(source, tmp_path / "out").path
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(converter, "write_safetensors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(ConversionError):
        convert(source, out, force=True, quantize=True)
    assert sorted(p.name for p in out.iterdir()) == before


def test_input_problems_fail_before_any_work(source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        convert(broken, tmp_path / "out")
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        convert(broken, tmp_path / "out")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'qwen2' is not supported"):
        convert(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_refuses_an_mlx_checkpoint_as_input(converted, tmp_path):
    with pytest.raises(CheckpointError, match="already an MLX checkpoint"):
        convert(converted["bf16"], tmp_path / "again")


@pytest.mark.parametrize("args, message", [
    (["--bits", "3", "--mode", "mxfp4"], "--bits 3 is not available with --mode mxfp4"),
    (["--mode", "mxfp4"], "--mode mxfp4 needs --group-size 32"),
])
def test_cli_argument_errors(source, tmp_path, capsys, args, message):
    assert cli(["--hf-path", str(source), "--mlx-path", str(tmp_path / "o"), "-q", *args]) == 1
    assert message in capsys.readouterr().err


def test_cli_converts_and_summarises(source, tmp_path, capsys):
    assert cli(["--hf-path", str(source), "--mlx-path", str(tmp_path / "o"), "-q", "--mode", "mxfp4",
                "--group-size", "32"]) == 0
    summary = capsys.readouterr().out
    assert "bits per weight" in summary and "wrote" in summary
    assert load_model(tmp_path / "o").model.layers[0].mlp.experts.down_proj.mode == "mxfp4"


def test_upload_is_called_after_a_complete_conversion(source, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(converter, "upload", lambda folder, repo: seen.append((folder, repo)))
    out = convert(source, tmp_path / "o", upload_repo="me/tiny-mlx").path
    assert seen == [(out, "me/tiny-mlx")]
