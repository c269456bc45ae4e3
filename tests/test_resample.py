"""`mlx_qwen36.resample`: torchvision's antialiased uint8 resize, bit for bit.

Live against `torchvision.transforms.v2.functional.resize(..., antialias=True)` on uint8 CPU tensors (the call
transformers' video processor makes) over shrinking, growing, mixed, tiny and extreme sizes; the rules that make it
differ from Pillow (horizontal pass first, int16 weights) also without torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_video_reference
from media_fixture import noise
from PIL import Image

from mlx_qwen36.resample import BICUBIC, BILINEAR, filter_weights, resize_uint8

# (height, width) -> (new height, new width): shrink, grow, one of each (both ways), 1-pixel sides, 2x exactly,
# strong shrinks, one axis untouched.
SIZES = [
    ((300, 500), (288, 512)), ((500, 300), (512, 288)), ((70, 101), (64, 96)), ((20, 30), (64, 96)),
    ((1, 150), (32, 128)), ((150, 1), (128, 32)), ((7, 3), (32, 32)), ((64, 64), (128, 128)), ((64, 64), (32, 32)),
    ((480, 640), (96, 128)), ((1080, 1920), (224, 416)), ((200, 2), (64, 32)), ((96, 96), (96, 64)),
    ((96, 96), (40, 96)), ((33, 95), (64, 160)),
]
RANDOM_SIZES = [tuple(tuple(int(v) for v in pair) for pair in np.random.default_rng(seed).integers(1, 300, (2, 2)))
                for seed in range(20)]


def torchvision_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    import torch
    import torchvision.transforms.v2.functional as tvF

    mode = {BICUBIC: tvF.InterpolationMode.BICUBIC, BILINEAR: tvF.InterpolationMode.BILINEAR}[resample]
    tensor = torch.from_numpy(np.moveaxis(image, -1, 0)).contiguous()
    out = tvF.resize(tensor, [height, width], interpolation=mode, antialias=True)
    return np.moveaxis(out.numpy(), 0, -1)


@pytest.mark.parametrize("resample", [BICUBIC, BILINEAR])
@pytest.mark.parametrize(("size", "target"), SIZES + RANDOM_SIZES)
def test_equals_torchvision(size, target, resample):
    require_video_reference()
    image = noise(*size)
    got = resize_uint8(image, *target, resample)
    want = torchvision_resize(image, *target, resample)
    assert got.shape == want.shape == (*target, 3)
    assert np.array_equal(got, want), f"{size} -> {target}: {np.count_nonzero(got != want)} values differ"


def test_frames_and_channel_counts_equal_torchvision():
    """A [T, H, W, C] stack resizes frame by frame; one and four channels follow the same arithmetic."""
    require_video_reference()
    frames = np.stack([noise(90, 120, seed=i) for i in range(3)])
    np.testing.assert_array_equal(resize_uint8(frames, 64, 96), np.stack([resize_uint8(f, 64, 96) for f in frames]))
    for channels in (1, 4):
        image = noise(90, 120, channels)
        np.testing.assert_array_equal(resize_uint8(image, 64, 160), torchvision_resize(image, 64, 160, BICUBIC))


def test_horizontal_pass_runs_first():
    """Shrinking the height while growing the width: torchvision filters rows first (Pillow columns first here),
    and the uint8 rounding between the passes makes the order visible."""
    image = noise(300, 500)
    got = resize_uint8(image, 288, 512)
    np.testing.assert_array_equal(got, resize_uint8(resize_uint8(image, 300, 512), 288, 512))
    columns_first = resize_uint8(resize_uint8(image, 288, 500), 288, 512)
    assert np.abs(got.astype(int) - columns_first).max() > 10
    pillow = np.asarray(Image.fromarray(image).resize((512, 288), Image.Resampling.BICUBIC))
    assert np.abs(got.astype(int) - pillow).max() > 10


def test_int16_weights_by_hand():
    """4 → 2 bilinear: centres 1 and 3, support 2, taps 0.75, 0.75, 0.25 normalised to 3/7, 3/7, 1/7; the
    largest weight allows 16 bits (3/7 · 2^17 ≥ 2^15), and each weight rounds half away from zero."""
    first, weights, precision = filter_weights(4, 2, BILINEAR)
    assert first.tolist() == [0, 1] and precision == 16
    assert weights[:, :3].tolist() == [[28087, 28087, 9362], [9362, 28087, 28087]]
    assert not weights[:, 3:].any()
    # Bicubic growth has negative lobes, rounded away from zero too.
    _, weights, precision = filter_weights(2, 4, BICUBIC)
    assert precision == 14 and weights[0, :2].tolist() == [17830, -1446]
    image = np.array([[[0], [80], [160], [240]]], np.uint8)  # one row: (0·3/7 + 80·3/7 + 160/7) → 57
    assert resize_uint8(image, 1, 2, BILINEAR)[0, :, 0].tolist() == [57, 183]


@pytest.mark.parametrize("level", [0, 1, 128, 254, 255])
def test_uniform_images_stay_uniform(level):
    image = np.full((37, 53, 3), level, np.uint8)
    for target in ((64, 96), (16, 20), (37, 200)):
        np.testing.assert_array_equal(resize_uint8(image, *target), level)


def test_unchanged_size_is_the_input_and_bad_arguments_are_errors():
    image = noise(40, 60)
    assert resize_uint8(image, 40, 60) is image
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(image.astype(np.float32), 32, 32)
    with pytest.raises(ValueError, match="0x32"):
        resize_uint8(image, 32, 0)
    with pytest.raises(ValueError, match="bilinear .2. or bicubic .3."):
        resize_uint8(image, 32, 32, resample=1)
