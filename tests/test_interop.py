"""Interop: checkpoints written by mlx-lm and mlx-vlm load here, and ours load there, with equal logits.

Every direction runs on the tiny release-layout checkpoints (MoE and dense, see tests/reference.py):

- mlx-lm -> us: `mlx_lm.convert` (fp32, bf16, 4-bit and 8-bit), loaded by `mlx_qwen36.load_model` and `mlx_lm.load`;
- mlx-vlm -> us: `mlx_vlm.convert` (fp32, 4-bit), text logits against mlx-vlm's and the transformers reference;
- us -> mlx-lm / mlx-vlm: our converter (fp32, uniform 8/4-bit, mixed recipe), loaded by `mlx_lm.load` and mlx-vlm;
- the on-disk tensors themselves: our uniform quantization against mlx-lm's, the expert gate/up split, and the
  vision tower against mlx-vlm's.

Quantized and bf16 checkpoints are compared in float32 compute on both sides (their stored values are exact in
float32, so the two loaders must agree to float noise); the tiny random models are chaotic enough that bf16
compute alone moves logits by ~0.7, which would hide a real difference. mlx-lm's own bf16 run is still checked to
work on our checkpoints.

Note on the fp32 sources: `mlx_lm.convert` and `mlx_vlm.convert` add the +1 to zero-centred norm weights in the
checkpoint dtype before casting (sanitize runs before `--dtype`), so converting the bf16 release to float32 rounds
`1 + w` to bf16 (max logit change 0.68 here). The transformers comparisons therefore convert an fp32 copy of the
release checkpoint (same values: bf16 is exact in fp32), which `golden["logits_release_fp32"]` describes.

A tiny word-level tokenizer is written beside the weights: both converters load a tokenizer, and the real Qwen3.6
one (tests/tokenizer_fixture.py) costs ~8 s per conversion; logits do not depend on it.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from conftest import KINDS
from mlx.utils import tree_flatten, tree_map

from mlx_qwen36 import load_model
from mlx_qwen36.convert import convert

FP32_TOL = 1e-4  # against the transformers reference, as in test_parity.py
SAME_REL = 1e-5  # two MLX loaders of one checkpoint: float noise only (observed ~2e-7 of the logit scale)
VLM_REL = 1e-4  # mlx-vlm's GDN/attention kernels differ a little more (observed ~6e-6 of the logit scale)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def write_tiny_tokenizer(dest: Path, vocab: int = 512) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t497", "unk_token": "t0"}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))


def fp32_copy(src: Path, dst: Path) -> None:
    """The release checkpoint with every tensor in float32 (values unchanged)."""
    dst.mkdir(parents=True)
    total = 0
    for f in sorted(src.glob("*.safetensors")):
        tensors = {k: v.astype(mx.float32) for k, v in mx.load(str(f)).items()}
        total += sum(v.nbytes for v in tensors.values())
        mx.save_safetensors(str(dst / f.name), tensors, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = total
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config))


def read_weights(folder: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(glob.glob(str(folder / "*.safetensors"))):
        out.update(mx.load(f))
    return out


def to_fp32(model: nn.Module) -> nn.Module:
    """Upcast every floating parameter (scales and biases of quantized layers too; packed weights stay uint32)."""
    model.update(tree_map(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x,
                          model.parameters()))
    return model


def logits(model, ids: np.ndarray) -> np.ndarray:
    out = model(mx.array(ids))
    out = getattr(out, "logits", out)  # mlx-vlm's language model returns an output object
    return np.array(out.astype(mx.float32))


def ours(folder: Path, ids: np.ndarray) -> np.ndarray:
    return logits(load_model(folder, dtype=mx.float32), ids)


def mlx_lm_fp32(folder: Path, ids: np.ndarray) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    return logits(to_fp32(model), ids)


def assert_same(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = float(np.abs(want).max())
    assert scale > 1.0, f"{what}: logits too small to make the tolerance meaningful"
    diff = float(np.abs(got - want).max())
    assert diff <= rel * scale, f"{what}: max |diff| {diff:.3g} > {rel:g} x logit scale {scale:.3g}"


def assert_reference(got: np.ndarray, golden: dict, what: str) -> None:
    diff = float(np.abs(got - golden["logits_release_fp32"]).max())
    assert diff <= FP32_TOL, f"{what}: max |diff| to the transformers reference {diff:.3g} > {FP32_TOL}"


def quantized_params(model: nn.Module) -> list[str]:
    return [k for k, _ in tree_flatten(model.parameters()) if k.endswith(".scales")]


# ---------------------------------------------------------------------------------------------------------------
# sources: the tiny release checkpoints plus a tokenizer, as bf16 (as released) and as an exact fp32 copy


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("interop-src")
    out = {}
    for kind in KINDS:
        bf16, fp32 = root / f"{kind}-bf16", root / f"{kind}-fp32"
        shutil.copytree(tiny[kind]["release"], bf16)
        fp32_copy(bf16, fp32)
        for d in (bf16, fp32):
            write_tiny_tokenizer(d)
        out[kind] = {"bfloat16": bf16, "float32": fp32}
    return out


# ---------------------------------------------------------------------------------------------------------------
# mlx-lm -> us

MLX_LM_VARIANTS = {
    # name: (source dtype, mlx_lm.convert kwargs)
    "fp32": ("float32", dict(dtype="float32")),
    "bf16": ("bfloat16", dict(dtype="bfloat16")),
    "q4-g32": ("bfloat16", dict(quantize=True, q_bits=4, q_group_size=32)),
    "q8-g64": ("bfloat16", dict(quantize=True, q_bits=8, q_group_size=64)),
}


@pytest.mark.parametrize("variant", list(MLX_LM_VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_mlx_lm_checkpoint_loads_here(sources, tiny, tmp_path, kind, variant):
    src_dtype, kwargs = MLX_LM_VARIANTS[variant]
    out = tmp_path / "mlx-lm"
    mlx_lm.convert(str(sources[kind][src_dtype]), str(out), **kwargs)
    ids = tiny[kind]["golden"]["input_ids"]

    model = load_model(out, dtype=mx.float32)
    assert "mtp" not in model  # mlx-lm drops the MTP head
    if kwargs.get("quantize"):
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == kwargs["q_bits"]
        assert quantized_params(model), "the quantized checkpoint loaded without any quantized layer"
    got = logits(model, ids)
    want = mlx_lm_fp32(out, ids)
    assert_same(got, want, SAME_REL, f"{kind} {variant}: ours vs mlx-lm")
    if variant == "fp32":
        assert_reference(want, tiny[kind]["golden"], f"{kind}: mlx-lm")
        assert_reference(got, tiny[kind]["golden"], f"{kind}: ours on the mlx-lm checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# us -> mlx-lm

OUR_VARIANTS = {
    "fp32": dict(dtype="float32"),
    "q8-uniform": dict(quantize=True, bits=8, group_size=64),
    "q4-uniform": dict(quantize=True, bits=4, group_size=32),
    "q4-mixed": dict(quantize=True, bits=4, group_size=32, recipe="mixed"),
}


@pytest.mark.parametrize("variant", list(OUR_VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_our_checkpoint_loads_in_mlx_lm(sources, tiny, tmp_path, kind, variant):
    opts = OUR_VARIANTS[variant]
    out = tmp_path / "ours"
    convert(sources[kind]["bfloat16"], out, **opts)
    ids = tiny[kind]["golden"]["input_ids"]

    theirs, _ = mlx_lm.load(str(out))  # mtp.* and vision_tower.* are dropped by mlx-lm's sanitize
    native = logits(theirs, ids)  # as loaded: bf16 compute with our fp32 norms, gathered quantized experts on CPU
    assert native.shape == (2, 12, 512) and np.isfinite(native).all()
    if opts.get("quantize"):
        layer = theirs.language_model.model.layers[0]
        attn_bits = 8 if opts.get("recipe") == "mixed" else opts["bits"]
        assert layer.linear_attn.in_proj_qkv.bits == attn_bits
        if kind == "moe":
            assert layer.mlp.gate.bits == 8  # the router is always 8-bit
            assert layer.mlp.switch_mlp.gate_proj.bits == opts["bits"]

    want = logits(to_fp32(theirs), ids)
    got = ours(out, ids)
    assert_same(want, got, SAME_REL, f"{kind} {variant}: mlx-lm vs ours")
    if variant == "fp32":
        assert_reference(want, tiny[kind]["golden"], f"{kind}: mlx-lm on our checkpoint")
        assert_reference(got, tiny[kind]["golden"], f"{kind}: ours")


# ---------------------------------------------------------------------------------------------------------------
# the on-disk tensors


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (8, 64)])
@pytest.mark.parametrize("kind", KINDS)
def test_uniform_quantization_equals_mlx_lm_tensors(sources, tmp_path, kind, bits, group_size):
    """Our uniform recipe writes mlx-lm's quantized checkpoint, tensor for tensor (the logits tests above compare
    two loaders of one file, so only this and the fp32 reference checks see what the converter wrote).

    By design ours keeps the zero-centred norms (1 + w) in fp32 where mlx-lm rounds them to bf16, and `A_log` and
    `dt_bias` in fp32 (same values).
    """
    src = sources[kind]["bfloat16"]
    mlx_lm.convert(str(src), str(tmp_path / "mlx-lm"), quantize=True, q_bits=bits, q_group_size=group_size)
    convert(src, tmp_path / "ours", quantize=True, bits=bits, group_size=group_size)
    theirs = read_weights(tmp_path / "mlx-lm")
    mine = {k: v for k, v in read_weights(tmp_path / "ours").items() if k.startswith("language_model.")}
    assert sorted(mine) == sorted(theirs)
    for name, want in theirs.items():
        got = mine[name]
        assert got.shape == want.shape, name
        if name.endswith(("norm.weight", ".A_log", ".dt_bias")) and ".linear_attn.norm." not in name:
            assert got.dtype == mx.float32, name
            got = got.astype(want.dtype)
        assert got.dtype == want.dtype, name
        assert mx.array_equal(got, want).item(), name

    def specs(folder: Path) -> dict:
        """Each quantized module's effective (bits, group_size): its override in config.json, else the default."""
        q = json.loads((folder / "config.json").read_text())["quantization"]
        modules = [k[: -len(".scales")] for k in theirs if k.endswith(".scales")]
        return {m: (q.get(m, q)["bits"], q.get(m, q)["group_size"]) for m in modules}

    assert specs(tmp_path / "ours") == specs(tmp_path / "mlx-lm")


def test_expert_gate_up_split(tiny, tmp_path):
    """gate_up_proj [E, 2I, H] holds the gate rows first: switch_mlp.gate_proj is the first half, up_proj the second.

    Also the MTP head's per-expert tensors, stacked in expert order.
    """
    src = tiny["moe"]["release"]
    out = tmp_path / "ours"
    convert(src, out, dtype="float32")
    I = json.loads((src / "config.json").read_text())["text_config"]["moe_intermediate_size"]  # noqa: E741
    source, written = read_weights(src), read_weights(out)
    layers = sorted({int(k.split(".")[3]) for k in source if k.endswith("mlp.experts.gate_up_proj")})
    assert layers, "the source has no fused experts"
    for i in layers:
        fused = source[f"model.language_model.layers.{i}.mlp.experts.gate_up_proj"].astype(mx.float32)
        assert fused.shape[1] == 2 * I
        gate, up = fused[:, :I], fused[:, I:]
        assert not mx.array_equal(gate, up).item(), "gate and up halves are equal: a swap would go unseen"
        base = f"language_model.model.layers.{i}.mlp.switch_mlp"
        assert mx.array_equal(written[f"{base}.gate_proj.weight"], gate).item(), f"layer {i}: gate_proj"
        assert mx.array_equal(written[f"{base}.up_proj.weight"], up).item(), f"layer {i}: up_proj"
        down = source[f"model.language_model.layers.{i}.mlp.experts.down_proj"].astype(mx.float32)
        assert mx.array_equal(written[f"{base}.down_proj.weight"], down).item(), f"layer {i}: down_proj"
    E = source[f"model.language_model.layers.{layers[0]}.mlp.experts.gate_up_proj"].shape[0]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stacked = mx.stack([source[f"mtp.layers.0.mlp.experts.{e}.{proj}.weight"] for e in range(E)])
        assert mx.array_equal(written[f"mtp.layers.0.mlp.switch_mlp.{proj}.weight"], stacked.astype(mx.float32)).item()


# ---------------------------------------------------------------------------------------------------------------
# mlx-vlm (optional: `pip install mlx-vlm==0.7.10 --no-deps` is enough for conversion and loading)


@pytest.fixture(scope="module")
def mlx_vlm():
    return pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (reference extra)")


def mlx_vlm_fp32(folder: Path, ids: np.ndarray) -> np.ndarray:
    from mlx_vlm.utils import load_model as vlm_load_model

    model = to_fp32(vlm_load_model(folder))
    return logits(model.language_model, ids)


MLX_VLM_VARIANTS = {
    "fp32": ("float32", dict(dtype="float32")),
    "q4-g32": ("bfloat16", dict(quantize=True, q_bits=4, q_group_size=32)),
}


@pytest.mark.parametrize("variant", list(MLX_VLM_VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_mlx_vlm_checkpoint_loads_here(mlx_vlm, sources, tiny, tmp_path, kind, variant):
    src_dtype, kwargs = MLX_VLM_VARIANTS[variant]
    out = tmp_path / "mlx-vlm"
    mlx_vlm.convert(str(sources[kind][src_dtype]), str(out), **kwargs)
    ids = tiny[kind]["golden"]["input_ids"]
    assert any(k.startswith("vision_tower.") for k in read_weights(out)), "mlx-vlm wrote no vision tower"

    model = load_model(out, dtype=mx.float32)  # text part: vision_tower.* is not built here yet
    if kwargs.get("quantize"):
        assert quantized_params(model), "the quantized checkpoint loaded without any quantized layer"
    got = logits(model, ids)
    assert_same(got, mlx_vlm_fp32(out, ids), VLM_REL, f"{kind} {variant}: ours vs mlx-vlm")
    if variant == "fp32":
        assert_reference(got, tiny[kind]["golden"], f"{kind}: ours on the mlx-vlm checkpoint")


@pytest.mark.parametrize("variant", ["fp32", "q4-mixed"])
def test_our_checkpoint_loads_in_mlx_vlm(mlx_vlm, sources, tiny, tmp_path, variant):
    out = tmp_path / "ours"
    convert(sources["moe"]["bfloat16"], out, **OUR_VARIANTS[variant])
    ids = tiny["moe"]["golden"]["input_ids"]
    assert_same(mlx_vlm_fp32(out, ids), ours(out, ids), VLM_REL, f"moe {variant}: mlx-vlm vs ours")


@pytest.fixture(scope="module")
def vision_tensors(mlx_vlm, sources, tmp_path_factory) -> tuple[dict, dict]:
    """(ours, mlx-vlm's) vision_tower.* tensors, both converted from the fp32 MoE source without quantization."""
    root = tmp_path_factory.mktemp("interop-vision")
    src = sources["moe"]["float32"]
    convert(src, root / "ours", dtype="float32")
    mlx_vlm.convert(str(src), str(root / "mlx-vlm"), dtype="float32")
    pick = lambda w: {k: v for k, v in w.items() if k.startswith("vision_tower.")}  # noqa: E731
    return pick(read_weights(root / "ours")), pick(read_weights(root / "mlx-vlm"))


PATCH_EMBED = "vision_tower.patch_embed.proj.weight"


def test_vision_tower_matches_mlx_vlm(vision_tensors):
    mine, theirs = vision_tensors
    assert sorted(mine) == sorted(theirs)
    for name in sorted(theirs):
        assert mine[name].shape == theirs[name].shape, name
        assert mx.array_equal(mine[name], theirs[name]).item(), name


def test_patch_embed_is_channels_last_like_mlx_vlm(vision_tensors):
    mine, theirs = vision_tensors
    assert mine[PATCH_EMBED].shape == theirs[PATCH_EMBED].shape
    assert mx.array_equal(mine[PATCH_EMBED], theirs[PATCH_EMBED]).item()
