"""Video preprocessing for the Qwen3.6 vision tower: frame sampling, the whole-clip pixel budget, patches and
per-pair timestamps, following transformers 5.24's `Qwen3VLVideoProcessor` and `Qwen3VLProcessor`
(ARCHITECTURE.md §7).

A video is either a file (path, `file://` URL, encoded bytes, or a `data:` URL), decoded with PyAV, or frames
you already have: `Video(frames, fps)` / `{"frames": [...], "fps": 10}` / a list of frames or a `[T, H, W, C]`
uint8 array (then the `fps` argument of the call applies). PyAV is imported only when a file is decoded; install
it with `pip install 'mlx-qwen36[video]'`.

Per video:
1. Sample frames: `n = clamp(int(total / video_fps · fps), min_frames, min(max_frames, total))`,
   `indices = linspace(0, total - 1, n).round()` (fps 2, min 4, max 768 by default). A clip that would need more
   than `max_frames` frames is sampled with `max_frames` frames instead, and a warning is logged.
2. `smart_resize` with the frame count: the pixel budget (`size.shortest_edge`/`longest_edge`, 4096 and
   25,165,824 in the release) covers `t·h·w`, the whole clip. With `cap_pixels_per_frame` the qwen-vl-utils
   per-frame cap applies (transformers 5.24 leaves it off by default, and so do we).
3. Each frame is resized exactly as torchvision's antialiased uint8 resize does (`mlx_qwen36.resample`:
   bicubic or bilinear, horizontal pass first), then rescaled and normalised with the torchvision backend's
   fused `(x - mean/rescale) / (std/rescale)`; an odd frame count is padded by repeating the last frame.
4. Patches `[gt·gh·gw, 1536]` in the image order, per temporal pair; `video_grid_thw = (n/2, H/16, W/16)`.
5. Timestamps: each temporal pair gets the mean time of its two frames, `index / video_fps` (the padded frame
   counts with its own index), as `Qwen3VLProcessor._calculate_timestamps` does. The prompt shows them as
   `<{t:.1f} seconds>`; see `Processor.expand_vision_tokens`.

`pixel_values_videos`, `video_grid_thw`, the sampled indices and the timestamps equal transformers' (tested
live against `Qwen3VLVideoProcessor` with torchvision). Differences, by design: a one-frame video is padded to two
frames instead of being rejected; `do_sample_frames=False` still keeps at most `max_frames` frames (with a
warning); a container that does not report its frame count is counted by decoding it (transformers' PyAV reader
would fail); frames are resized as they are decoded, on up to `RESIZE_WORKERS` threads, so a long video never
holds more than a few of its full-size frames in memory.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mlx_qwen36.image_processor import (
    FromConfig,
    _describe,
    as_tensors,
    load_image,
    normalize_to_float,
    patchify,
    read_source_bytes,
    to_rgb_array,
    validate_common,
)
from mlx_qwen36.resample import RESAMPLE_FILTERS, resize_uint8

__all__ = [
    "Video",
    "VideoMetadata",
    "VideoProcessor",
    "load_video",
    "pair_timestamps",
    "sample_frame_indices",
    "video_smart_resize",
]

logger = logging.getLogger(__name__)

VIDEO_PREPROCESSOR_CONFIG_FILE = "video_preprocessor_config.json"
DEFAULT_VIDEO_FPS = 24.0  # what transformers assumes when frames come without their fps
RESIZE_WORKERS = min(8, os.cpu_count() or 1)  # threads resizing frames; NumPy releases the GIL while it works
PIP_HINT = "pip install 'mlx-qwen36[video]'"
UNSUPPORTED_CODEC = (
    "unsupported video codec: the FFmpeg libraries PyAV uses have no decoder for it; re-encode the video "
    "(e.g. to H.264, VP9 or MPEG-4)"
)


# --------------------------------------------------------------------------------------------------------
# Inputs and metadata
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Video:
    """Frames you already have (PIL images, uint8 `(H, W, C)` arrays, or one `[T, H, W, C]` array) and the
    rate they were captured at. `fps=None` means unknown: the processor's `fps` argument, else 24 (as in
    transformers, with a warning)."""

    frames: Any
    fps: float | None = None


@dataclasses.dataclass
class VideoMetadata:
    """What was sampled from one video: `frames_indices` index the source's frames, timestamps are
    `index / fps` seconds."""

    total_num_frames: int
    fps: float
    frames_indices: list[int]
    width: int
    height: int
    source: str = ""

    @property
    def duration(self) -> float:
        return self.total_num_frames / self.fps

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each sampled frame."""
        return [index / self.fps for index in self.frames_indices]


def sample_frame_indices(
    total_num_frames: int,
    video_fps: float,
    fps: float | None = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    name: str = "video",
) -> np.ndarray:
    """transformers' `Qwen3VLVideoProcessor.sample_frames`: `fps` frames per second of video, at least
    `min_frames`, at most `max_frames` and `total_num_frames`, spread by `linspace(...).round()`; as there are
    no more of them than frames, they strictly increase.

    `fps=None` keeps every frame (up to max_frames). Logs a warning when max_frames lowers the rate.
    """
    if total_num_frames <= 0:
        raise ValueError(f"{name}: the video has no frames")
    if fps is not None:
        wanted = int(total_num_frames / video_fps * fps)
        if wanted > max_frames:
            logger.warning(
                "%s: %d frames at %g fps exceed max_frames=%d; sampling %d frames uniformly instead (%.3g fps)",
                name, wanted, fps, max_frames, max_frames, max_frames * video_fps / total_num_frames,
            )
        num_frames = min(max(wanted, min_frames), max_frames, total_num_frames)
    else:
        if total_num_frames > max_frames:
            logger.warning(
                "%s: %d frames exceed max_frames=%d; keeping %d frames spread uniformly",
                name, total_num_frames, max_frames, max_frames,
            )
        num_frames = min(max(total_num_frames, min_frames), max_frames, total_num_frames)
    return np.linspace(0, total_num_frames - 1, num_frames).round().astype(np.int64)


def video_smart_resize(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = 4096,
    max_pixels: int = 25165824,
) -> tuple[int, int]:
    """transformers' `qwen3_vl` video `smart_resize`: the budget applies to `t·h·w`, the whole clip."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height} (width x height)")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pair_timestamps(frames_indices: Sequence[int], video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds per temporal patch: the mean of its first and last frame's `index / fps`, the index list padded
    with its last entry to a multiple of temporal_patch_size (`Qwen3VLProcessor._calculate_timestamps`)."""
    indices = [int(i) for i in frames_indices]
    if not indices:
        return []
    if len(indices) % temporal_patch_size:
        indices.extend([indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size))
    times = [index / video_fps for index in indices]
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)
    ]


# --------------------------------------------------------------------------------------------------------
# Decoding with PyAV
# --------------------------------------------------------------------------------------------------------


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"decoding video files needs PyAV, which is not installed: {PIP_HINT}") from exc
    return av


def _decode_errors(av) -> tuple[type[BaseException], ...]:
    return (av.error.FFmpegError, OSError, ValueError, EOFError, LookupError, MemoryError)


class _Container:
    """An opened video file: its first video stream, fps and frame count, with clear errors."""

    def __init__(self, source: Any, name: str) -> None:
        self.av = _import_av()
        self.name = name
        if isinstance(source, (bytes, bytearray, memoryview)):
            data: bytes | Path = bytes(source)
        else:
            data = read_source_bytes(source, name, "video")
        if isinstance(data, bytes) and not data:
            raise ValueError(f"{name}: the video data is empty")
        self.data = data
        self.container = self._open()
        try:
            streams = self.container.streams.video
            if not streams:
                raise ValueError(f"{name}: the file has no video stream")
            self.stream = streams[0]
            if self.stream.codec_context is None:
                raise ValueError(f"{name}: {UNSUPPORTED_CODEC}")
            rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
            self.fps: float | None = float(rate) if rate and Fraction(rate) > 0 else None
            self.total = int(self.stream.frames or 0)
        except BaseException:
            self.container.close()
            raise

    def _open(self):
        try:
            return self.av.open(io.BytesIO(self.data) if isinstance(self.data, bytes) else str(self.data), mode="r")
        except _decode_errors(self.av) as exc:
            raise ValueError(f"{self.name}: cannot open the video ({type(exc).__name__}: {exc})") from exc

    def frames(self) -> Iterator[Any]:
        """Decode the stream from the start, turning decoder failures into ValueError."""
        container = self._open()
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoder = container.decode(stream)
            index = 0
            while True:
                try:
                    frame = next(decoder)
                except StopIteration:
                    return
                except self.av.error.DecoderNotFoundError as exc:
                    raise ValueError(f"{self.name}: {UNSUPPORTED_CODEC}") from exc
                except _decode_errors(self.av) as exc:
                    raise ValueError(
                        f"{self.name}: the video does not decode (frame {index}: {type(exc).__name__}: {exc})"
                    ) from exc
                yield frame
                index += 1
        finally:
            container.close()

    def count_frames(self) -> int:
        return sum(1 for _ in self.frames())

    def close(self) -> None:
        self.container.close()


class _Resizer:
    """Resizes a clip's frames to one size, fixed by the first frame, on worker threads; keeps the order and at
    most two frames per worker waiting at full size, so a long video never holds many of them.

    Called from one thread only (the decoding loop); `frames()` waits for the last results.
    """

    def __init__(self, processor: VideoProcessor, count: int, name: str, workers: int | None = None) -> None:
        workers = RESIZE_WORKERS if workers is None else workers
        self.processor, self.count, self.name = processor, count, name
        self.size: tuple[int, int] | None = None
        self.target: tuple[int, int] | None = None
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mlx_qwen36-resize") if workers > 1 else None
        self.limit = 2 * workers
        self.pending: deque[Future] = deque()
        self.done: list[np.ndarray] = []

    def __call__(self, rgb: np.ndarray) -> None:
        if self.target is None:
            self.size = rgb.shape[:2]
            self.target = self.processor._target(self.count, rgb.shape[0], rgb.shape[1], self.name)
        if self.pool is None:
            self.done.append(resize_uint8(rgb, *self.target, self.processor.resample))
            return
        self.pending.append(self.pool.submit(resize_uint8, rgb, *self.target, self.processor.resample))
        if len(self.pending) > self.limit:
            self._collect()

    def _collect(self) -> None:
        self.done.append(self.pending.popleft().result())

    def frames(self) -> list[np.ndarray]:
        while self.pending:
            self._collect()
        return self.done

    def __enter__(self) -> _Resizer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _decode_selected(container: _Container, indices: np.ndarray, resizer: _Resizer) -> int:
    """Hand the frames at `indices` (increasing) to `resizer` as they are decoded; returns how many frames the
    stream yielded up to the last index (fewer than it declared when it ended early)."""
    wanted = set(indices.tolist())
    last = int(indices[-1])
    seen = 0
    for i, frame in enumerate(container.frames()):
        seen = i + 1
        if i in wanted:
            resizer(frame.to_ndarray(format="rgb24"))
        if i >= last:
            break
    return seen


# --------------------------------------------------------------------------------------------------------
# The video processor
# --------------------------------------------------------------------------------------------------------

_VIDEO_FIELDS = (
    "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor", "resample",
    "do_resize", "do_rescale", "do_normalize", "fps", "min_frames", "max_frames", "do_sample_frames",
    "cap_pixels_per_frame", "max_video_tokens",
)


@dataclasses.dataclass
class VideoProcessor(FromConfig):
    """Qwen3.6 video preprocessing; defaults are the released `video_preprocessor_config.json` values and
    `Qwen3VLVideoProcessor`'s class defaults (fps 2, 4-768 frames).

    `processor(videos=[...])` → `{"pixel_values_videos": float32 [N, 1536], "video_grid_thw": int64 [n, 3],
    "video_timestamps": [[seconds per temporal pair], ...], "video_metadata": [VideoMetadata, ...]}`.
    """

    min_pixels: int = 4096  # size.shortest_edge, for the whole clip
    max_pixels: int = 25165824  # size.longest_edge, for the whole clip
    fps: float | None = 2.0  # frames sampled per second of video; None keeps every frame
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    CONFIG_FILE: ClassVar[str] = VIDEO_PREPROCESSOR_CONFIG_FILE
    FIELDS: ClassVar[tuple[str, ...]] = _VIDEO_FIELDS

    def __post_init__(self) -> None:
        validate_common(self)
        if self.min_frames < 1 or self.max_frames < 1 or self.min_frames > self.max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames} and {self.max_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.do_resize and self.resample not in RESAMPLE_FILTERS:
            raise ValueError(
                f"resample={self.resample}: video frames are resized like torchvision's antialiased resize, which "
                "is implemented for bilinear (2) and bicubic (3)"
            )

    # -- geometry ------------------------------------------------------------------------------------

    def sample_indices(self, total_num_frames: int, video_fps: float, name: str = "video") -> np.ndarray:
        """Which source frames are used (sorted; see `sample_frame_indices`)."""
        fps = self.fps if self.do_sample_frames else None
        return sample_frame_indices(total_num_frames, video_fps, fps, self.min_frames, self.max_frames, name)

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) of every frame of a clip of `num_frames` sampled frames."""
        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            frame_cap = self.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        # A single frame is padded to temporal_patch_size frames; size it as such (transformers rejects it).
        frames = max(num_frames, self.temporal_patch_size)
        return video_smart_resize(
            frames, height, width, self.temporal_patch_size, factor, self.min_pixels, max_pixels
        )

    def grid_thw(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The `video_grid_thw` row for `num_frames` sampled frames of this size."""
        resized_h, resized_w = self.resized_size(num_frames, height, width)
        padded = -(-max(num_frames, 1) // self.temporal_patch_size) * self.temporal_patch_size
        return padded // self.temporal_patch_size, resized_h // self.patch_size, resized_w // self.patch_size

    # -- processing ----------------------------------------------------------------------------------

    def _finish(self, frames: list[np.ndarray], name: str) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Resized RGB uint8 frames → patches and grid (pads to a multiple of temporal_patch_size)."""
        pad = -len(frames) % self.temporal_patch_size
        if pad:
            frames = frames + [frames[-1]] * pad
        stack = normalize_to_float(
            np.stack(frames),
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
            fused=True,
        )
        try:
            return patchify(stack, self.patch_size, self.merge_size, self.temporal_patch_size)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} (do_resize is off)") from exc

    def _target(self, num_frames: int, height: int, width: int, name: str) -> tuple[int, int]:
        try:
            return self.resized_size(num_frames, height, width)
        except ValueError as exc:
            raise ValueError(f"{name} ({width}x{height} frames): {exc}") from exc

    def _from_frames(self, frames: Any, video_fps: float | None, name: str):
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4:
                raise ValueError(f"{name}: a video array must be [T, H, W, C] uint8, got shape {frames.shape}")
            frames = list(frames)
        elif isinstance(frames, (list, tuple)):
            frames = list(frames)
        else:
            raise ValueError(f"{name}: frames must be a list of images or a [T, H, W, C] array")
        if not frames:
            raise ValueError(f"{name}: the video has no frames")
        if video_fps is None:
            logger.warning(
                "%s: frames given without their fps; assuming %g fps (as transformers does). Pass fps= for "
                "correct sampling and timestamps.", name, DEFAULT_VIDEO_FPS,
            )
            video_fps = DEFAULT_VIDEO_FPS
        indices = self.sample_indices(len(frames), video_fps, name)
        with _Resizer(self, len(indices), name) as resizer:
            for i in indices.tolist():
                frame_name = f"{name} frame {i}"
                resizer(to_rgb_array(load_image(frames[i], frame_name), frame_name))
            resized = resizer.frames()
        height, width = resizer.size
        return resized, VideoMetadata(len(frames), float(video_fps), indices.tolist(), width, height, name)

    def _from_file(self, source: Any, name: str):
        container = _Container(source, name)
        try:
            fps = container.fps
            total = container.total
        finally:
            container.close()
        if fps is None:
            logger.warning("%s: the file does not state its frame rate; assuming %g fps", name, DEFAULT_VIDEO_FPS)
            fps = DEFAULT_VIDEO_FPS
        if total <= 0:
            total = container.count_frames()
            if total == 0:
                raise ValueError(f"{name}: the video has no frames")
        for _attempt in range(2):
            indices = self.sample_indices(total, fps, name)
            with _Resizer(self, len(indices), name) as resizer:
                seen = _decode_selected(container, indices, resizer)
                frames = resizer.frames()
            if len(frames) == len(indices):
                break
            if seen == 0:
                raise ValueError(f"{name}: the video has no frames")
            logger.warning("%s: the stream holds %d frames, not the %d it declares; resampling", name, seen, total)
            total = seen
        else:  # pragma: no cover - the second pass samples within the frames counted by the first
            raise ValueError(f"{name}: the video's frame count is inconsistent between decoding passes")
        height, width = resizer.size
        return frames, VideoMetadata(total, float(fps), indices.tolist(), width, height, name)

    def load(self, video: Any, fps: float | None = None, name: str | None = None):
        """One video → (sampled frames resized to the clip's size as RGB uint8 arrays, VideoMetadata)."""
        name = name or f"video ({_describe(video)})"
        if isinstance(video, Video):
            return self._from_frames(video.frames, video.fps if video.fps is not None else fps, name)
        if isinstance(video, Mapping):
            if "frames" not in video:
                raise ValueError(f"{name}: a video dict needs 'frames' (and 'fps')")
            video_fps = video.get("fps")
            return self._from_frames(video["frames"], video_fps if video_fps is not None else fps, name)
        if isinstance(video, (np.ndarray, list, tuple)):
            return self._from_frames(video, fps, name)
        if isinstance(video, (str, Path, bytes, bytearray, memoryview)):
            return self._from_file(video, name)
        raise ValueError(
            f"{name}: unsupported video input; give a path, bytes, a data: URL, Video(frames, fps), "
            "{'frames': [...], 'fps': ...}, a list of frames or a [T, H, W, C] array"
        )

    def preprocess_one(self, video: Any, fps: float | None = None, name: str | None = None):
        """One video → (patches `[gt·gh·gw, 1536]`, grid `(gt, gh, gw)`, pair timestamps, VideoMetadata)."""
        name = name or f"video ({_describe(video)})"
        frames, metadata = self.load(video, fps, name)
        patches, grid = self._finish(frames, name)
        timestamps = pair_timestamps(metadata.frames_indices, metadata.fps, self.temporal_patch_size)
        return patches, grid, timestamps, metadata

    def __call__(self, videos: Any, fps: float | None = None, return_tensors: str | None = None) -> dict[str, Any]:
        """Videos → `{"pixel_values_videos", "video_grid_thw", "video_timestamps", "video_metadata"}`.

        `videos` is one video or a list of videos. A list made only of frames (PIL images, `(H, W, C)`
        arrays) is one video. `fps` is the frame rate of videos given as frames without one. The arrays are
        NumPy, or `mx.array` with `return_tensors="mlx"`.
        """
        if _is_single_video(videos):
            items = [videos]
        else:
            items = list(videos)
        if not items:
            raise ValueError("no videos given")
        all_patches, grids, stamps, metas = [], [], [], []
        for index, video in enumerate(items):
            name = f"videos[{index}] ({_describe(video)})"
            patches, grid, timestamps, metadata = self.preprocess_one(video, fps, name)
            all_patches.append(patches)
            grids.append(grid)
            stamps.append(timestamps)
            metas.append(metadata)
        outputs = {
            "pixel_values_videos": np.concatenate(all_patches, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
            "video_timestamps": stamps,
            "video_metadata": metas,
        }
        return as_tensors(outputs, return_tensors)

    preprocess = __call__


def _is_frame(item: Any) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim in (2, 3))


def _is_single_video(videos: Any) -> bool:
    if isinstance(videos, (str, Path, bytes, bytearray, memoryview, Video, Mapping, np.ndarray)):
        return True
    if isinstance(videos, (list, tuple)):
        return bool(videos) and all(_is_frame(item) for item in videos)
    return True


def load_video(
    source: Any,
    fps: float | None = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    video_fps: float | None = None,
) -> tuple[list[np.ndarray], VideoMetadata]:
    """Decode and sample one video at full resolution: (RGB uint8 `(H, W, 3)` frames, VideoMetadata).

    The sampling is the processor's (`fps=None` keeps every frame up to max_frames). Meant for inspection and
    tests; `VideoProcessor` resizes frames while decoding instead of holding them at full size.
    """
    processor = VideoProcessor(fps=fps, min_frames=min_frames, max_frames=max_frames, do_resize=False)
    return processor.load(source, video_fps)
