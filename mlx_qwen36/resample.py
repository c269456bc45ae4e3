"""torchvision's antialiased resize of uint8 frames, in NumPy and bit for bit.

Video frames reach the vision tower through `torchvision.transforms.v2.functional.resize(frames, size, BICUBIC,
antialias=True)` on a uint8 CPU tensor, both in transformers 5.24's `Qwen3VLVideoProcessor` and in qwen-vl-utils,
which prepared the model's training videos. That call runs PyTorch's uint8 kernel, a port of Pillow-SIMD:

- separable filters with Pillow's taps (the support widened by the scale when shrinking, the weights normalised
  to sum to one), computed in float64;
- the weights quantised to int16 with a precision chosen from the largest weight, and the pixels summed in
  integers (rounding offset, arithmetic shift, clamp to 0..255);
- the horizontal pass always first, its output rounded to uint8 before the vertical pass.

Pillow's own `Image.resize` (what images go through, see `image_processor`) differs twice: 22-bit weights (±1
level on 0.1-0.5% of the values of random pixels) and, when one side shrinks while the other grows, the vertical
pass first (then up to 25 levels on random pixels, where the uint8 rounding between the passes clips). Past
the float64 weights everything is integer arithmetic, so nothing drifts between platforms; `tests/test_resample.py`
checks the port against torchvision.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RESAMPLE_FILTERS", "filter_weights", "resize_uint8"]

BILINEAR, BICUBIC = 2, 3  # PIL.Image.Resampling values, as configs store them
CUBIC_A = -0.5  # Keys' a, the value Pillow and PyTorch's antialiased kernels use


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    # PyTorch's cubic_convolution1 / cubic_convolution2, in the same operation order.
    x = np.abs(x)
    a = CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# resample value -> (filter, its support at scale 1)
RESAMPLE_FILTERS = {BILINEAR: (_bilinear, 2), BICUBIC: (_bicubic, 4)}


def filter_weights(in_size: int, out_size: int, resample: int = BICUBIC) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis of the resize: (first input index per output `[out]`, int32 weights `[out, taps]`, precision).

    Output i is `(Σ_k w[i, k] · x[first[i] + k] + 2^(p-1)) >> p`, clamped to 0..255; the taps past an output's
    window have weight 0 (PyTorch's `_compute_indices_int16_weights_aa`).
    """
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be bilinear (2) or bicubic (3) for this resize, got {resample}")
    kernel, interp_size = RESAMPLE_FILTERS[resample]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0

    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    size = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    j = np.arange(taps)
    inside = j[None, :] < size[:, None]
    weights = np.where(inside, kernel((j[None, :] + first[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed tap by tap, as the C loop does
        total += weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)

    w_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    quantised = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return first, quantised, precision


def _resize_rows(frames: np.ndarray, out_size: int, resample: int) -> np.ndarray:
    """One pass along axis 0, where each tap gathers whole contiguous rows."""
    first, weights, precision = filter_weights(frames.shape[0], out_size, resample)
    last = frames.shape[0] - 1
    acc = np.full((out_size, *frames.shape[1:]), 1 << (precision - 1), np.int32)
    term = np.empty_like(acc)
    column_shape = (out_size,) + (1,) * (frames.ndim - 1)
    for k in range(weights.shape[1]):
        column = weights[:, k]
        if not column.any():
            continue
        np.multiply(frames[np.minimum(first + k, last)], column.reshape(column_shape), out=term)
        acc += term
    acc >>= precision
    return np.clip(acc, 0, 255).astype(np.uint8)


def _resize_axis(frames: np.ndarray, out_size: int, axis: int, resample: int) -> np.ndarray:
    rows = np.ascontiguousarray(np.moveaxis(frames, axis, 0))
    return np.moveaxis(_resize_rows(rows, out_size, resample), 0, axis)


def resize_uint8(frames: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """Resize uint8 `[..., H, W, C]` frames to `[..., height, width, C]` exactly as torchvision's antialiased
    resize of a uint8 tensor does on the CPU: bicubic always, bilinear where torchvision takes its uint8 kernel
    (AVX2 and Arm CPUs; elsewhere it resizes bilinear in float32)."""
    if frames.dtype != np.uint8 or frames.ndim < 3:
        raise ValueError(f"expected uint8 [..., H, W, C] frames, got {frames.dtype} with shape {frames.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize to {width}x{height} (width x height)")
    if frames.shape[-2] != width:
        frames = _resize_axis(frames, width, frames.ndim - 2, resample)
    if frames.shape[-3] != height:
        frames = _resize_axis(frames, height, frames.ndim - 3, resample)
    return np.ascontiguousarray(frames)
