"""The vision tower, 3-D positions and the multimodal forward, live against transformers on the tiny checkpoints.

The tiny tower (tests/reference.py): depth 2, hidden 32, 2 heads (head_dim 16), an 8x8 learned position grid, patch
16, temporal patch 2, merge 2, out_hidden 64; special ids image 498, video 499, vision start 500, vision end 501.
Pixel values are random arrays of the processor's shape [patches, 3*2*16*16], fed identically to both sides.

Checks that need torch/transformers skip without them (CI runs strict, where a skip fails); the others (frame
independence, the spec's position example, error messages, text-only loading) also run on the committed fixtures.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import KINDS, reference_available
from reference import SPECIAL_IDS, write_damped_checkpoint

from mlx_qwen36 import ModelConfig, load_model
from mlx_qwen36 import vision as vision_module
from mlx_qwen36.image_processor import ImageProcessor
from mlx_qwen36.positions import get_rope_index, text_position_ids

IMG, VID, VS, VE = (SPECIAL_IDS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id"))
PATCH = 3 * 2 * 16 * 16
TOWER_TOL = 1e-4
LOGIT_TOL = 1e-4


def requires_reference():
    if not reference_available():
        pytest.skip("torch and transformers are not installed (reference extra): cannot compare with transformers")


def pixels(grids, seed: int = 0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, PATCH)).astype(np.float32)


def pads(grid, token: int) -> list[int]:
    t, h, w = grid
    return [token] * (h * w // 4)


def text(n: int, seed: int) -> list[int]:
    return np.random.default_rng(100 + seed).integers(0, 490, size=n).tolist()


def image_prompt(grid) -> list[int]:
    return [VS, *pads(grid, IMG), VE]


def video_prompt(grid, seed: int = 0) -> list[int]:
    """Per frame pair: a 'timestamp' text token, then <vs> pads <ve> (the Qwen3.6 video expansion)."""
    t, h, w = grid
    out = []
    for k in range(t):
        out += [*text(1, seed + k), VS, *pads((1, h, w), VID), VE]
    return out


IMAGE_GRIDS = [(1, 4, 6), (1, 6, 10)]
VIDEO_GRID = (3, 4, 4)


def mixed_prompt() -> list[int]:
    """Text, an image, text, a second image, text, a 3-frame video, text."""
    return (text(3, 0) + image_prompt(IMAGE_GRIDS[0]) + text(4, 1) + image_prompt(IMAGE_GRIDS[1]) + text(2, 2)
            + video_prompt(VIDEO_GRID, 3) + text(5, 4))


@pytest.fixture(scope="module")
def config(tiny) -> ModelConfig:
    return ModelConfig.from_file(tiny["moe"]["hf"] / "config.json")


@pytest.fixture(scope="module")
def ours(tiny):
    return {kind: load_model(tiny[kind]["hf"]) for kind in KINDS}


@pytest.fixture(scope="module")
def theirs(tiny):
    requires_reference()
    import torch
    from transformers import AutoModelForImageTextToText

    return {kind: AutoModelForImageTextToText.from_pretrained(tiny[kind]["hf"], dtype=torch.float32).eval()
            for kind in KINDS}


def hf_tower(model, pv: np.ndarray, grids) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pv), grid_thw=torch.tensor(grids, dtype=torch.long))
    return out.pooler_output.numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ---------------------------------------------------------------------------------------------------------------
# The tower


TOWER_CASES = {
    "one image": [(1, 4, 6)],
    "two images of different sizes": [(1, 4, 6), (1, 12, 10)],
    "video t=3": [(3, 4, 4)],
    "image, video, image": [(1, 2, 2), (3, 6, 4), (1, 16, 18)],
}


@pytest.mark.parametrize("case", list(TOWER_CASES))
def test_tower_matches_transformers(ours, theirs, case):
    grids = TOWER_CASES[case]
    pv = pixels(grids)
    got = np.array(ours["moe"].visual(mx.array(pv), mx.array(grids)))
    want = hf_tower(theirs["moe"], pv, grids)
    assert got.shape == want.shape == (sum(t * h * w for t, h, w in grids) // 4, 64)
    diff = max_diff(got, want)
    assert diff <= TOWER_TOL, f"{case}: tower max abs diff {diff:.3g} (scale {np.abs(want).max():.3g})"


def test_tower_batches_frames_like_single_segments(ours, monkeypatch):
    """Batched equal-length frames give what one SDPA call per frame gives."""
    grids = [(4, 4, 6), (1, 4, 6), (2, 2, 2)]
    pv = mx.array(pixels(grids, seed=3))
    tower = ours["moe"].visual
    assert [r[2] for r in tower.attention_runs(np.array(grids))] == [5, 2]
    batched = tower(pv, grids)
    monkeypatch.setattr(vision_module, "ATTENTION_BATCH_ELEMENTS", 1)
    assert [r[2] for r in tower.attention_runs(np.array(grids))] == [1] * 7
    assert max_diff(batched, tower(pv, grids)) <= 1e-6


# A frame of 288 patches (2 * 288**2 scores in the tiny tower's 2 heads), a 2-frame video that one call can batch
# (2 * 2 * 24**2 = 2304 scores) and a frame of 120 patches, under a budget that splits neither frame evenly: query
# chunks of 4100 // (2 * 288) = 7 and 4100 // (2 * 120) = 17 rows, each with a shorter last chunk.
LARGE_GRIDS = [(1, 16, 18), (2, 4, 6), (1, 12, 10)]
SMALL_BUDGET = 4100
UNBOUNDED = 1 << 62


def spy_attention(monkeypatch, fused_available: bool = False) -> list[dict]:
    """Record every SDPA call's score elements (batch x heads x queries x keys) and whether it forced a fused kernel.
    With `fused_available`, a forced call succeeds, as on Metal (the unfused result stands in for the fused one's)."""
    real = mx.fast.scaled_dot_product_attention
    calls: list[dict] = []

    def spy(q, k, v, *, scale, force_fused=False, **kwargs):
        calls.append({"scores": q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2], "fused": force_fused})
        if force_fused and fused_available:
            return real(q, k, v, scale=scale, **kwargs)
        return real(q, k, v, scale=scale, force_fused=force_fused, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    return calls


def tower_features(tower, grids, budget: int, monkeypatch, seed: int = 4) -> np.ndarray:
    monkeypatch.setattr(vision_module, "ATTENTION_BATCH_ELEMENTS", budget)
    return np.array(tower(mx.array(pixels(grids, seed)).astype(tower.patch_embed.proj.weight.dtype), grids)
                    .astype(mx.float32))


def test_attention_scores_stay_within_the_budget(ours, monkeypatch):
    """Without a fused kernel (the CPU back end), no SDPA call holds more than ATTENTION_BATCH_ELEMENTS scores: the
    large frames run in query chunks, and the features equal those of one call per frame."""
    tower = ours["moe"].visual
    whole = tower_features(tower, LARGE_GRIDS, UNBOUNDED, monkeypatch)
    calls = spy_attention(monkeypatch)
    chunked = tower_features(tower, LARGE_GRIDS, SMALL_BUDGET, monkeypatch)
    unfused = [c["scores"] for c in calls if not c["fused"]]
    assert max(unfused) <= SMALL_BUDGET, f"an SDPA call held {max(unfused)} scores, over {SMALL_BUDGET}"
    # Per block: the 288-patch frame in ceil(288 / 7) chunks, the video in one call, the 120-patch frame in 8 chunks.
    assert len(unfused) == tower.cfg.depth * (42 + 1 + 8)
    assert sum(c["fused"] for c in calls) == tower.cfg.depth * 2, "the fused kernel was not asked for first"
    assert max_diff(chunked, whole) <= 1e-6


def test_chunked_attention_in_bfloat16(tiny, monkeypatch):
    tower = load_model(tiny["moe"]["hf"], dtype=mx.bfloat16).visual
    whole = tower_features(tower, LARGE_GRIDS, UNBOUNDED, monkeypatch)
    chunked = tower_features(tower, LARGE_GRIDS, SMALL_BUDGET, monkeypatch)
    assert max_diff(chunked, whole) <= 1e-2 * np.abs(whole).max()


def test_chunked_tower_matches_transformers(ours, theirs, monkeypatch):
    grids = LARGE_GRIDS
    got = tower_features(ours["moe"].visual, grids, SMALL_BUDGET, monkeypatch)
    want = hf_tower(theirs["moe"], pixels(grids, seed=4), grids)
    assert max_diff(got, want) <= TOWER_TOL


def test_fused_kernel_is_used_where_available(ours, monkeypatch):
    """Where the back end has a fused kernel (Metal, head dims 64, 72, 80, ...), a large frame stays one call."""
    tower = ours["moe"].visual
    whole = tower_features(tower, LARGE_GRIDS, UNBOUNDED, monkeypatch)
    calls = spy_attention(monkeypatch, fused_available=True)
    fused = tower_features(tower, LARGE_GRIDS, SMALL_BUDGET, monkeypatch)
    assert [c["fused"] for c in calls] == [True, False, True] * tower.cfg.depth
    assert max_diff(fused, whole) <= 1e-6


def test_attention_peak_memory_is_bounded(ours, monkeypatch):
    """Measured: with chunks, the tower's peak over a 3136-patch frame is a fraction of the frame's fp32 scores
    [heads, N, N] (78.7 MB), which one SDPA call holds; what is left is O(N) (the rotary, qkv, MLP activations)."""
    tower = ours["moe"].visual
    grids = [(1, 56, 56)]
    pv = mx.array(pixels(grids, seed=6))
    scores_bytes = tower.cfg.num_heads * (56 * 56) ** 2 * 4

    def peak(budget: int) -> tuple[int, mx.array]:
        monkeypatch.setattr(vision_module, "ATTENTION_BATCH_ELEMENTS", budget)
        mx.eval(pv)
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out = tower(pv, grids)
        mx.eval(out)
        return mx.get_peak_memory() - before, out

    whole_peak, whole = peak(UNBOUNDED)
    chunked_peak, chunked = peak(1 << 18)
    assert whole_peak >= scores_bytes, "the unchunked call should hold the whole score matrix"
    assert chunked_peak <= scores_bytes / 4, f"peak {chunked_peak / 2**20:.1f} MiB with chunks"
    assert max_diff(chunked, whole) <= 1e-6


def test_frames_do_not_attend_to_each_other(ours):
    """Changing frame 1 of a video (or a second image) leaves every other frame's features unchanged."""
    tower = ours["moe"].visual
    grids = [(3, 4, 4), (1, 4, 6)]
    pv = pixels(grids)
    base = np.array(tower(mx.array(pv), grids))
    frame = 4 * 4
    changed = pv.copy()
    changed[frame:2 * frame] = np.random.default_rng(9).uniform(-1, 1, size=(frame, PATCH))
    out = np.array(tower(mx.array(changed), grids))
    per = frame // 4
    assert np.array_equal(out[:per], base[:per]), "frame 0 changed when frame 1 did"
    assert np.array_equal(out[2 * per:], base[2 * per:]), "frame 2 or the image changed when frame 1 did"
    assert max_diff(out[per:2 * per], base[per:2 * per]) > 1e-3, "frame 1's own features did not change"


def test_tower_rejects_bad_grids(ours):
    tower = ours["moe"].visual
    with pytest.raises(ValueError, match="describes 24"):
        tower(mx.array(pixels([(1, 4, 4)])), [(1, 4, 6)])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        tower(mx.array(pixels([(1, 3, 4)])), [(1, 3, 4)])


# ---------------------------------------------------------------------------------------------------------------
# Positions


def test_spec_example_positions(config):
    """ARCHITECTURE.md §7: [t t VS img×6 (grid 1×4×6) VE t t t]."""
    ids = [[5, 6, VS, *[IMG] * 6, VE, 7, 8, 9]]
    pos, delta = get_rope_index(mx.array(ids), [[1, 4, 6]], None, config)
    assert np.array(pos[0, 0]).tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9]
    assert np.array(pos[1, 0]).tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9]
    assert np.array(pos[2, 0]).tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9]
    assert np.array(delta).tolist() == [-3]


def test_text_only_positions(config):
    pos, delta = get_rope_index(mx.array([[1, 2, 3, 4]]), None, None, config)
    assert np.array(pos).tolist() == [[[0, 1, 2, 3]]] * 3
    assert np.array(delta).tolist() == [0]
    assert np.array(text_position_ids(7, 2, mx.array([-3, 0]))).tolist() == [[[4, 5], [7, 8]]] * 3


def hf_rope_index(model, ids: np.ndarray, image_grids, video_grids, mask=None):
    import torch

    types = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    with torch.no_grad():
        pos, delta = model.model.get_rope_index(
            torch.from_numpy(ids.astype(np.int64)), mm_token_type_ids=torch.from_numpy(types),
            image_grid_thw=None if image_grids is None else torch.tensor(image_grids),
            video_grid_thw=None if video_grids is None else torch.tensor(video_grids),
            attention_mask=None if mask is None else torch.from_numpy(mask))
    return pos.numpy(), delta.numpy().reshape(-1)


def test_rope_index_matches_transformers(config, theirs):
    """Text + two images + a video in row 0, a video and an image after left padding in row 1."""
    row0 = mixed_prompt()
    row1 = text(2, 7) + video_prompt((2, 6, 4), 8) + text(3, 9) + image_prompt((1, 2, 2)) + text(2, 10)
    T = max(len(row0), len(row1))
    ids = np.zeros((2, T), dtype=np.int64)
    mask = np.zeros((2, T), dtype=np.int64)
    ids[0, T - len(row0):], mask[0, T - len(row0):] = row0, 1
    ids[1, T - len(row1):], mask[1, T - len(row1):] = row1, 1
    image_grids = [*IMAGE_GRIDS, (1, 2, 2)]
    video_grids = [VIDEO_GRID, (2, 6, 4)]

    pos, delta = get_rope_index(mx.array(ids), image_grids, video_grids, config, attention_mask=mx.array(mask))
    want_pos, want_delta = hf_rope_index(theirs["moe"], ids, image_grids, video_grids, mask)
    assert np.array_equal(np.array(pos), want_pos)
    assert np.array(delta).tolist() == want_delta.tolist()

    one = np.array([row0])
    pos, delta = get_rope_index(one, IMAGE_GRIDS, [VIDEO_GRID], config)
    want_pos, want_delta = hf_rope_index(theirs["moe"], one, IMAGE_GRIDS, [VIDEO_GRID])
    assert np.array_equal(np.array(pos), want_pos)
    assert np.array(delta).tolist() == want_delta.tolist() and want_delta[0] < 0


def test_rope_index_rejects_unmatched_pads(config):
    ids = mx.array([[1, VS, *[IMG] * 5, VE]])
    with pytest.raises(ValueError, match="run of 5 <\\|image_pad\\|> tokens"):
        get_rope_index(ids, [[1, 4, 6]], None, config)
    with pytest.raises(ValueError, match="more <\\|video_pad\\|> tokens than video_grid_thw"):
        get_rope_index(mx.array([[1, VID, 2]]), None, None, config)


# ---------------------------------------------------------------------------------------------------------------
# The multimodal forward


def mixed_inputs():
    ids = np.array([mixed_prompt()], dtype=np.int32)
    return ids, pixels(IMAGE_GRIDS, seed=1), pixels([VIDEO_GRID], seed=2)


def hf_forward(model, ids, pv, pvv, image_grids=IMAGE_GRIDS, video_grids=(VIDEO_GRID,)):
    """transformers' logits for the pixel inputs, plus the inputs_embeds and position_ids its language model got."""
    import torch

    seen = {}

    def capture(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().double().numpy()
        seen["positions"] = kwargs["position_ids"].numpy()

    types = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    dtype = next(model.parameters()).dtype
    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), mm_token_type_ids=torch.from_numpy(types),
                        pixel_values=torch.from_numpy(pv).to(dtype), image_grid_thw=torch.tensor(image_grids),
                        pixel_values_videos=torch.from_numpy(pvv).to(dtype), video_grid_thw=torch.tensor(video_grids),
                        use_cache=False)
    finally:
        hook.remove()
    return out.logits.double().numpy(), seen["embeds"], seen["positions"]


def our_logits(model, ids, pv, pvv) -> np.ndarray:
    return np.array(model(mx.array(ids), pixel_values=mx.array(pv), image_grid_thw=IMAGE_GRIDS,
                          pixel_values_videos=mx.array(pvv), video_grid_thw=[VIDEO_GRID]))


@pytest.fixture(scope="module")
def damped(tmp_path_factory):
    """{kind: (ours, transformers')}: fp32 models built at reference.DAMPED_INITIALIZER_RANGE."""
    requires_reference()
    import torch
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("damped")
    models = {}
    for kind in KINDS:
        path = write_damped_checkpoint(kind, out)
        models[kind] = (load_model(path),
                        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval())
    return models


@pytest.mark.parametrize("kind", KINDS)
def test_multimodal_logits_match_transformers(damped, kind):
    """Text + two images + a 3-frame video through `Model(input_ids, pixel_values=..., ...)` against
    `Qwen3_5(Moe)ForConditionalGeneration` on the same arrays, in fp32: logits within 1e-4, and what transformers'
    language model receives (the embeddings with the vision rows scattered in, tower included, within 1e-5; the
    3-D position ids bit for bit).

    The models are damped copies of the tiny ones (see reference.DAMPED_INITIALIZER_RANGE): the default tiny
    decoder turns fp32 rounding into logit differences above 1e-4 on a prompt this long, in transformers itself.
    """
    ours, theirs = damped[kind]
    ids, pv, pvv = mixed_inputs()
    got = our_logits(ours, ids, pv, pvv)
    want, want_embeds, want_positions = hf_forward(theirs, ids, pv, pvv)

    embeds, positions, _ = ours.prepare_inputs(mx.array(ids), mx.array(pv), IMAGE_GRIDS, mx.array(pvv),
                                               [VIDEO_GRID])
    assert np.array_equal(np.array(positions), want_positions)
    vision_rows = (ids == IMG) | (ids == VID)
    assert vision_rows.sum() == (24 + 60 + 48) // 4
    assert max_diff(embeds, want_embeds) <= 1e-5

    diff = max_diff(got, want)
    assert np.abs(want).max() > 1.0, "the logits are too small for the bound to mean anything"
    assert diff <= LOGIT_TOL, f"{kind}: logits max abs diff {diff:.3g} (scale {np.abs(want).max():.3g})"
    # The pixels matter far beyond the bound: no pixels (pad embeddings, 1-D positions), or other images.
    assert max_diff(got, np.array(ours(mx.array(ids)))) > 0.1
    assert max_diff(got, our_logits(ours, ids, pixels(IMAGE_GRIDS, seed=7), pvv)) > 0.1


def test_decode_after_image_prefill(ours):
    """Prefill a multimodal prompt into a cache, then decode text with position cache_len + rope_delta."""
    model = ours["moe"]
    ids, pv, pvv = mixed_inputs()
    cont = np.array([text(4, 11)], dtype=np.int32)
    full_ids = np.concatenate([ids, cont], axis=1)
    full = np.array(model(mx.array(full_ids), pixel_values=mx.array(pv), image_grid_thw=IMAGE_GRIDS,
                          pixel_values_videos=mx.array(pvv), video_grid_thw=[VIDEO_GRID]))

    emb, pos, delta = model.prepare_inputs(mx.array(ids), mx.array(pv), IMAGE_GRIDS, mx.array(pvv), [VIDEO_GRID])
    assert np.array(delta).tolist() == np.array(model.rope_deltas(mx.array(ids), IMAGE_GRIDS, [VIDEO_GRID])).tolist()
    assert np.array(delta)[0] < 0
    cache = model.make_cache()
    last = np.array(model.prefill(mx.array(ids), cache, chunk_size=7, input_embeddings=emb, position_ids=pos))
    T = ids.shape[1]
    assert max_diff(last, full[:, T - 1]) <= 1e-4
    for i in range(cont.shape[1]):
        step_pos = text_position_ids(cache[0].offset, 1, delta)
        logits = np.array(model(mx.array(cont[:, i:i + 1]), cache, position_ids=step_pos))
        assert max_diff(logits[:, -1], full[:, T + i]) <= 1e-4, f"decode step {i}"


def test_multimodal_prompt_continues_a_cache(ours):
    """An image prompt after cached text (multi-turn): positions start at cache length + the cached delta."""
    model = ours["moe"]
    ids, pv, pvv = mixed_inputs()
    full = our_logits(model, ids, pv, pvv)
    split = 4  # text and the first <vision_start>, before the first image pad
    cache = model.make_cache()
    model(mx.array(ids[:, :split]), cache)
    emb, pos, delta = model.prepare_inputs(mx.array(ids[:, split:]), mx.array(pv), IMAGE_GRIDS, mx.array(pvv),
                                           [VIDEO_GRID], cache=cache)
    assert np.array(delta).tolist() == np.array(model.rope_deltas(mx.array(ids), IMAGE_GRIDS, [VIDEO_GRID])).tolist()
    rest = np.array(model(mx.array(ids[:, split:]), cache, position_ids=pos, input_embeddings=emb))
    assert max_diff(rest, full[:, split:]) <= 1e-4


def test_processor_outputs_feed_the_forward(ours):
    """`model(ids, **image_processor(images=...))`: NumPy outputs and `return_tensors="mlx"` give the same logits."""
    processor = ImageProcessor(min_pixels=0, max_pixels=64 * 96)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8)
    as_numpy, as_mlx = processor(images=[image]), processor(images=[image], return_tensors="mlx")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and isinstance(as_mlx["pixel_values"], mx.array)
    assert as_numpy["image_grid_thw"].tolist() == np.array(as_mlx["image_grid_thw"]).tolist() == [[1, 4, 6]]
    ids = mx.array([[5, VS, *[IMG] * 6, VE, 7]])
    model = ours["moe"]
    with_pixels = model(ids, **as_numpy)
    assert mx.array_equal(with_pixels, model(ids, **as_mlx)).item()
    assert max_diff(with_pixels, model(ids)) > 1e-2
    with pytest.raises(ValueError, match="return_tensors must be None, 'np' or 'mlx'"):
        processor(images=[image], return_tensors="pt")


def test_pad_count_mismatch_is_a_clear_error(ours):
    model = ours["moe"]
    ids = np.array([[1, VS, *[IMG] * 5, VE, 2]], dtype=np.int32)
    with pytest.raises(ValueError, match=r"5 <\|image_pad\|> tokens but the image grids give 6 features"):
        model(mx.array(ids), pixel_values=mx.array(pixels([(1, 4, 6)])), image_grid_thw=[(1, 4, 6)])
    with pytest.raises(ValueError, match="without image_grid_thw"):
        model(mx.array(ids), pixel_values=mx.array(pixels([(1, 4, 6)])))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_text_only_load_has_no_tower(tiny, ours):
    text_only = load_model(tiny["moe"]["release"], text_only=True)
    assert "visual" not in text_only
    from mlx.utils import tree_flatten

    assert not any(k.startswith("visual.") for k, _ in tree_flatten(text_only.parameters()))
    ids, pv, _ = mixed_inputs()
    with pytest.raises(ValueError, match="without its vision tower"):
        text_only(mx.array(ids), pixel_values=mx.array(pv), image_grid_thw=IMAGE_GRIDS)
    # Text logits do not depend on whether the tower was loaded.
    full = load_model(tiny["moe"]["release"])
    assert "visual" in full
    x = mx.array(tiny["moe"]["golden"]["input_ids"])
    assert mx.array_equal(full(x), text_only(x)).item()


def test_tower_weights_are_loaded_and_validated(tiny, ours, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlx_qwen36 import CheckpointError

    model = ours["moe"]
    w = np.array(model.visual.patch_embed.proj.weight)
    hf = load_file(str(next(tiny["moe"]["hf"].glob("*.safetensors"))))
    assert np.array_equal(w, hf["model.visual.patch_embed.proj.weight"].transpose(0, 2, 3, 4, 1))
    assert np.array_equal(np.array(model.visual.pos_embed.weight), hf["model.visual.pos_embed.weight"])

    bad = tmp_path / "bad"
    shutil.copytree(tiny["moe"]["hf"], bad)
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.visual.merger.linear_fc2.weight"] = np.zeros((64, 100), dtype=np.float32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"shape mismatch.*visual\.merger\.linear_fc2\.weight"):
        load_model(bad)
    assert "visual" not in load_model(bad, text_only=True)


def write_tiny_tokenizer(dest) -> None:
    """mlx_vlm.convert loads a tokenizer; the logits do not depend on it."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t497", "unk_token": "t0"}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))


def test_mlx_layout_towers_load(tiny, ours, tmp_path):
    """`vision_tower.*` from our converter and from mlx-vlm loads as `visual.*` and gives the same features; mlx-vlm's
    own tower agrees on its checkpoint."""
    import shutil

    from mlx_qwen36.convert import convert

    grids = [(1, 4, 6), (2, 4, 4)]
    pv = mx.array(pixels(grids, seed=5))
    want = np.array(ours["moe"].visual(pv, grids))

    src = tmp_path / "src"
    shutil.copytree(tiny["moe"]["hf"], src)
    write_tiny_tokenizer(src)
    convert(src, tmp_path / "ours", dtype="float32")
    mine = load_model(tmp_path / "ours")
    assert max_diff(mine.visual(pv, grids), want) <= 1e-6

    mlx_vlm = pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (reference extra)")
    from mlx_vlm.utils import load_model as vlm_load_model

    mlx_vlm.convert(str(src), str(tmp_path / "mlx-vlm"), dtype="float32")
    loaded = load_model(tmp_path / "mlx-vlm")
    assert max_diff(loaded.visual(pv, grids), want) <= 1e-6
    theirs_tower = vlm_load_model(tmp_path / "mlx-vlm").vision_tower
    assert max_diff(theirs_tower(pv, mx.array(grids))[0], want) <= 1e-5
