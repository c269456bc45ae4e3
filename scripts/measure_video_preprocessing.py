"""Time of `VideoProcessor` per sampled frame, and of its resize against Pillow's.

    python scripts/measure_video_preprocessing.py [--frames 60] [--height 1080] [--width 1920]

The clip is random frames at 2 fps, so every frame is sampled; the released budget (25,165,824 pixels for the whole
clip) sets the size each frame is resized to.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from mlx_qwen36.resample import resize_uint8
from mlx_qwen36.video import Video, VideoProcessor


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.frames, args.height, args.width, 3), np.uint8)
    processor = VideoProcessor()
    height, width = processor.resized_size(args.frames, args.height, args.width)
    whole = best_of(lambda: processor(videos=Video(frames, fps=2)), repeats=1)
    exact = best_of(lambda: resize_uint8(frames[0], height, width))
    pillow = best_of(lambda: Image.fromarray(frames[0]).resize((width, height), Image.Resampling.BICUBIC))
    print(f"{args.frames} frames of {args.width}x{args.height} -> {width}x{height}")
    print(f"VideoProcessor: {whole:.2f} s, {1000 * whole / args.frames:.0f} ms per frame")
    print(f"one frame's resize: mlx_qwen36.resample {1000 * exact:.0f} ms, Pillow {1000 * pillow:.0f} ms")


if __name__ == "__main__":
    main()
