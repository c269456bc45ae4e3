"""The prompt cache's identity (dtype, quantization and weights, not only the config), its file under any name, and
its snapshots' bytes: counted once each and kept within a budget."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mlx_qwen36 import load_model, make_prompt_cache, synthetic
from mlx_qwen36.convert import convert
from mlx_qwen36.prompt_cache import PromptCache, PromptCacheError

PROMPT = [5, 17, 3, 99, 42, 7, 250, 11]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("MLX_QWEN36_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny fp32 checkpoint, its 4- and 8-bit conversions, and a checkpoint of the same config, other weights."""
    base = tmp_path_factory.mktemp("fingerprint")
    cfg = synthetic.text_config("tiny")
    fp32 = synthetic.write_checkpoint(base / "fp32", cfg, dtype=mx.float32)
    return {"fp32": fp32, "other": synthetic.write_checkpoint(base / "other", cfg, dtype=mx.float32, seed=1),
            "q4": convert(fp32, base / "q4", quantize=True, bits=4, group_size=32).path,
            "q8": convert(fp32, base / "q8", quantize=True, bits=8, group_size=32).path}


def filled(model, tokens: list[int] = PROMPT, boundaries: tuple[int, ...] = (3, 6)) -> PromptCache:
    """A prompt cache holding `tokens`, snapshotted at `boundaries` and at the end."""
    pc = make_prompt_cache(model)
    start = 0
    for end in (*boundaries, len(tokens)):
        model(mx.array([tokens[start:end]]), cache=pc.cache)
        pc.record(tokens[start:end])
        pc.mark()
        start = end
    return pc


@pytest.fixture(scope="module")
def saved(checkpoints, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "fp32.safetensors"
    filled(load_model(checkpoints["fp32"])).save(path)
    return path


@pytest.mark.parametrize("lazy", [False, True])
def test_same_model_reloaded_accepts_the_cache(checkpoints, saved, lazy):
    model = load_model(checkpoints["fp32"], lazy=lazy)  # lazy: the fingerprint reads only the small tensors
    loaded = PromptCache.load(model, saved)
    assert loaded.tokens == PROMPT
    assert loaded.reuse(model, [*PROMPT, 1]) == len(PROMPT)


@pytest.mark.parametrize("variant", ["bf16", "q4", "q8", "other", "quantized-in-memory"])
def test_another_dtype_quantization_or_weights_refuses_the_cache(checkpoints, saved, variant):
    if variant == "bf16":
        model = load_model(checkpoints["fp32"], dtype="bfloat16")
    elif variant == "quantized-in-memory":  # the same shapes as q4 on disk, reached another way
        import mlx.nn as nn

        model = load_model(checkpoints["fp32"])
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    else:
        model = load_model(checkpoints[variant])
    with pytest.raises(PromptCacheError, match="saved by another model"):
        PromptCache.load(model, saved)
    with pytest.raises(PromptCacheError, match="made by another model"):
        PromptCache.load(load_model(checkpoints["fp32"]), saved).reuse(model, PROMPT)


def test_the_quantization_mode_is_part_of_the_identity(checkpoints):
    from mlx_qwen36.prompt_cache import model_fingerprint

    model = load_model(checkpoints["q4"])
    before = model_fingerprint(model)
    model.lm_head.mode = "mxfp4"  # the arrays stay; only the spec they are read with changes
    assert model_fingerprint(model) != before


@pytest.mark.parametrize("name", ["turn1.cache", "turn1", "turn1.safetensors", "turn1.npz", ".hidden"])
def test_a_cache_saved_under_any_name_loads(checkpoints, tmp_path, name):
    model = load_model(checkpoints["fp32"])
    pc = filled(model)
    pc.save(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing else written, no suffix appended
    loaded = PromptCache.load(model, tmp_path / name)
    assert loaded.tokens == pc.tokens and sorted(loaded.snapshots) == sorted(pc.snapshots)


def test_conversation_is_saved_with_the_cache(checkpoints, tmp_path):
    model = load_model(checkpoints["fp32"])
    pc = filled(model)
    conversation = {"messages": [{"role": "user", "content": "Hi"}], "think": False}
    pc.save(tmp_path / "c", conversation=conversation)
    assert PromptCache.load(model, tmp_path / "c").conversation == conversation
    with pytest.raises(ValueError, match="cannot be saved"):
        pc.save(tmp_path / "d", conversation={"image": object()})
    assert not (tmp_path / "d").exists()


def test_a_loaded_cache_shares_arrays_as_the_saved_one_did(checkpoints, tmp_path):
    model = load_model(checkpoints["fp32"])
    pc = filled(model)
    pc.save(tmp_path / "c")
    loaded = PromptCache.load(model, tmp_path / "c")
    assert loaded.nbytes == pc.nbytes  # the latest snapshot is the state's arrays again, not a copy


def test_snapshots_are_counted_once_each(checkpoints):
    model = load_model(checkpoints["fp32"])
    pc = filled(model)  # snapshots at 0 (empty), 3, 6 and 8 (the current state)
    state = sum(c.nbytes for c in pc.cache)
    one_snapshot = sum(c.nbytes for c in pc.cache if type(c).__name__ == "GDNCache")
    assert one_snapshot > 0
    assert pc.snapshot_nbytes == 2 * one_snapshot  # 3 and 6; 8 shares the state's arrays, KV ones are offsets
    assert pc.nbytes == state + 2 * one_snapshot
    pc.reuse(model, PROMPT[:7])  # back to 6: the state is now that snapshot's arrays
    assert pc.snapshot_nbytes == one_snapshot


def test_snapshots_stay_within_their_byte_budget(checkpoints):
    model = load_model(checkpoints["fp32"])
    one_snapshot = sum(c.nbytes for c in filled(model).cache if type(c).__name__ == "GDNCache")
    pc = make_prompt_cache(model, max_snapshot_bytes=2 * one_snapshot)
    tokens = list(range(10, 40))
    for i, t in enumerate(tokens):
        model(mx.array([[t]]), cache=pc.cache)
        pc.record([t])
        pc.mark()
        assert pc.snapshot_nbytes <= 2 * one_snapshot
        assert 0 in pc.snapshots and i + 1 in pc.snapshots  # never the empty one, never the newest
    assert sorted(pc.snapshots) == [0, len(tokens) - 2, len(tokens) - 1, len(tokens)]  # the most recent kept
    tight = make_prompt_cache(model, max_snapshot_bytes=0)
    for t in tokens[:5]:
        model(mx.array([[t]]), cache=tight.cache)
        tight.record([t])
        tight.mark()
    assert sorted(tight.snapshots) == [0, 5]


def test_the_fingerprint_leaves_lazy_weights_unloaded(tmp_path):
    from mlx_qwen36.prompt_cache import model_fingerprint

    cfg = synthetic.text_config("tiny", vocab_size=248320)  # a 64 MB embedding and lm_head each
    model = load_model(synthetic.write_checkpoint(tmp_path / "m", cfg, dtype=mx.float32), lazy=True)
    mx.clear_cache()
    before = mx.get_active_memory()
    model_fingerprint(model)
    assert mx.get_active_memory() - before < 1 << 20
