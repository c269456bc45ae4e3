"""Test media: random and moving-gradient frames, and small video files encoded with PyAV by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_PATCHES = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor"}
# The released preprocessor_config.json and video_preprocessor_config.json (ARCHITECTURE.md §7).
RELEASED_IMAGE_CONFIG = {**_PATCHES, "size": {"longest_edge": 16777216, "shortest_edge": 65536},
                         "image_processor_type": "Qwen2VLImageProcessorFast"}
RELEASED_VIDEO_CONFIG = {**_PATCHES, "size": {"shortest_edge": 4096, "longest_edge": 25165824},
                         "video_processor_type": "Qwen3VLVideoProcessor"}


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random pixels: the hardest case for resampling parity."""
    return np.random.default_rng(seed + height * 7919 + width).integers(0, 256, (height, width, channels), np.uint8)


def noise_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """`[count, height, width, 3]` uint8 random frames, each different."""
    return np.stack([noise(height, width, seed=seed + 1000 * i) for i in range(count)])


def gradient_frame(index: int, height: int, width: int) -> np.ndarray:
    """A coloured gradient that moves with the frame index, so every frame differs."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    frame = np.stack(
        [
            255 * ((x + index / 24) % 1.0) * np.ones_like(y),
            255 * ((y + index / 12) % 1.0) * np.ones_like(x),
            np.full((height, width), (index * 37) % 256, dtype=np.float64),
        ],
        axis=-1,
    )
    return frame.astype(np.uint8)


def encode_video(av, path: Path, frames: int, fps: int, height: int, width: int, codec: str = "mpeg4") -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for index in range(frames):
        frame = av.VideoFrame.from_ndarray(gradient_frame(index, height, width), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def decode_all(av, path: Path) -> list[np.ndarray]:
    """Every frame, decoded independently of mlx_qwen36.video."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def write_config(folder: Path, config: dict, name: str = "preprocessor_config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(config))
    return folder
