"""Bad checkpoints fail before any model is returned, with an error naming the file and the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen36 import CheckpointError, ConfigError, load_model
from mlx_qwen36.loader import resolve_model_path


@pytest.fixture
def ckpt(tiny, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny["moe"]["release"], dst)
    return dst


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_missing_shard(ckpt):
    shards(ckpt)[1].unlink()
    with pytest.raises(CheckpointError, match=r"missing shard.*model-00002-of-00002\.safetensors"):
        load_model(ckpt)


def test_truncated_shard(ckpt):
    shard = shards(ckpt)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: truncated: tensor '.+'"):
        load_model(ckpt)


def test_corrupt_header(ckpt):
    shard = shards(ckpt)[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!!\x00"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: corrupt safetensors header"):
        load_model(ckpt)


def test_not_a_safetensors_file(ckpt):
    shards(ckpt)[0].write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_model(ckpt)


def load_file(shard: Path) -> dict[str, mx.array]:
    return dict(mx.load(str(shard)))


def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    mx.save_safetensors(str(shard), tensors)


def _index_add(folder: Path, name: str, shard: Path) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][name] = shard.name
    index.write_text(json.dumps(data))


def test_shape_mismatch_names_file_and_tensor(ckpt):
    shard = next(s for s in shards(ckpt) if "model.language_model.layers.1.linear_attn.in_proj_z.weight"
                 in load_file(s))

    def edit(t):
        t["model.language_model.layers.1.linear_attn.in_proj_z.weight"] = mx.zeros((63, 64))

    _rewrite(shard, edit)
    with pytest.raises(CheckpointError, match=rf"shape mismatch in .*{shard.name} \(tensor "
                                              r"'model\.language_model\.layers\.1\.linear_attn\.in_proj_z\.weight'\)"
                                              r": \(63, 64\) in the checkpoint, \(64, 64\) expected"):
        load_model(ckpt)


def test_unexpected_tensor_name(ckpt):
    shard = shards(ckpt)[0]
    _rewrite(shard, lambda t: t.update({"model.language_model.layers.0.mystery.weight": mx.zeros(3)}))
    _index_add(ckpt, "model.language_model.layers.0.mystery.weight", shard)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor in .*{shard.name} \(tensor "
                                              r"'model\.language_model\.layers\.0\.mystery\.weight'\)"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    shard = next(s for s in shards(ckpt) if "lm_head.weight" in load_file(s))
    _rewrite(shard, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing from the checkpoint, e.g. 'lm_head.weight'"):
        load_model(ckpt)


def test_config_disagreeing_with_weights(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["linear_num_value_heads"] = 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(ckpt)


def test_folder_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no config.json; this folder is not a model checkpoint"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": {}}))
    with pytest.raises(ConfigError, match="text_config.hidden_size"):
        load_model(tmp_path)


def test_config_without_weights(ckpt):
    for s in shards(ckpt):
        s.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_model(ckpt)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_path(f)


def test_nonexistent_local_path():
    with pytest.raises(CheckpointError, match="no such folder, and not a Hugging Face repo id"):
        resolve_model_path("./does/not/exist")


def test_hub_unreachable_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="cannot be reached and the model is not in the local cache"):
        resolve_model_path("mlx-community/not-cached-model")


def test_hub_repo_from_local_cache(tiny, tmp_path, monkeypatch):
    """A repo id resolves offline from the Hub cache layout (models--owner--name/snapshots/<rev>)."""
    import huggingface_hub.constants as c

    repo = tmp_path / "models--someone--tiny-qwen36"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny["dense"]["hf"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_path("someone/tiny-qwen36") == snap
    g = tiny["dense"]["golden"]
    model = load_model("someone/tiny-qwen36")
    assert np.abs(np.array(model(mx.array(g["input_ids"]))) - g["logits_fp32"]).max() <= 1e-4
