"""Video preprocessing (ARCHITECTURE.md §7): frame sampling, the whole-clip pixel budget, padding, timestamps and
patches, bit for bit against transformers 5.24's `Qwen3VLVideoProcessor` (torchvision backend) built from the same
`video_preprocessor_config.json`, on random frames and on small clips the tests encode with PyAV; then the input
forms and the errors.

The live comparisons need torchvision (the reference extra); CI runs them strictly.
"""

from __future__ import annotations

import base64
import logging
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import require_video_reference
from media_fixture import RELEASED_VIDEO_CONFIG, decode_all, encode_video, noise, noise_frames, write_config
from PIL import Image

from mlx_qwen36 import video as video_module
from mlx_qwen36.image_processor import smart_resize
from mlx_qwen36.video import (
    VIDEO_PREPROCESSOR_CONFIG_FILE,
    Video,
    VideoProcessor,
    load_video,
    pair_timestamps,
    sample_frame_indices,
)


@pytest.fixture(scope="module")
def av():
    return pytest.importorskip("av", reason="PyAV encodes and decodes the test videos (pip install av)")


def spec_indices(total: int, video_fps: float, fps: float = 2, min_frames: int = 4, max_frames: int = 768):
    n = min(max(int(total / video_fps * fps), min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


# --------------------------------------------------------------------------------------------------------
# Parity with transformers' Qwen3VLVideoProcessor
# --------------------------------------------------------------------------------------------------------


def both_processors(tmp_path, overrides: dict):
    """(ours, transformers') from one video_preprocessor_config.json."""
    require_video_reference()
    from transformers import Qwen3VLVideoProcessor

    config = {**RELEASED_VIDEO_CONFIG, "cap_pixels_per_frame": False, **overrides}
    folder = write_config(tmp_path / "config", config, VIDEO_PREPROCESSOR_CONFIG_FILE)
    return VideoProcessor.from_pretrained(folder), Qwen3VLVideoProcessor.from_pretrained(folder)


def reference_outputs(theirs, clips: list[tuple[np.ndarray, float]]) -> dict:
    """transformers on `[T, H, W, 3]` uint8 clips with their fps, plus the timestamps its processor prints."""
    from transformers import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    metadata = [VideoMetadata(total_num_frames=len(frames), fps=fps, height=frames.shape[1], width=frames.shape[2])
                for frames, fps in clips]
    out = theirs(videos=[frames for frames, _ in clips], video_metadata=metadata, return_metadata=True,
                 return_tensors="np")
    # Without sampling transformers keeps every frame and leaves frames_indices unset.
    out["indices"] = [list(range(m.total_num_frames)) if m.frames_indices is None else
                      np.asarray(m.frames_indices).tolist() for m in out["video_metadata"]]
    # Qwen3VLProcessor._calculate_timestamps does not use the processor's state (and pads its list in place).
    out["timestamps"] = [Qwen3VLProcessor._calculate_timestamps(None, list(indices), m.fps, theirs.temporal_patch_size)
                         for indices, m in zip(out["indices"], out["video_metadata"])]
    return out


def assert_video_parity(got: dict, want: dict, label: str) -> None:
    assert got["video_grid_thw"].tolist() == np.asarray(want["video_grid_thw"]).tolist(), label
    assert [m.frames_indices for m in got["video_metadata"]] == want["indices"], label
    assert got["video_timestamps"] == want["timestamps"], label
    pixels, reference = got["pixel_values_videos"], np.asarray(want["pixel_values_videos"])
    assert pixels.dtype == np.float32 and pixels.shape == reference.shape, label
    diff = float(np.abs(pixels - reference).max())
    assert diff == 0.0, f"{label}: max |ours - transformers| = {diff}"


SMALL_BUDGET = {"shortest_edge": 4096, "longest_edge": 4 * 96 * 128}
# name: (config overrides, frames, height, width, fps)
PARITY_CASES = {
    "released config, no resize": ({}, 24, 64, 96, 10),
    "odd sampled count is padded": ({}, 35, 70, 101, 10),
    "height shrinks, width grows": ({}, 9, 300, 500, 4),  # Pillow would run the vertical pass first here
    "clip above the pixel budget": ({"size": SMALL_BUDGET}, 20, 480, 640, 10),
    "portrait above the budget": ({"size": SMALL_BUDGET}, 12, 500, 300, 6),
    "clip below the minimum": ({"size": {"shortest_edge": 4 * 64 * 96, "longest_edge": 25165824}}, 12, 20, 30, 6),
    "extreme aspect ratio": ({}, 8, 16, 2000, 4),
    "per-frame cap": ({"cap_pixels_per_frame": True, "max_video_tokens": 6}, 40, 256, 320, 8),
    "fps 1, at most 6 frames": ({"fps": 1, "max_frames": 6}, 90, 48, 64, 5),
    "every frame (no sampling)": ({"do_sample_frames": False}, 7, 64, 64, 30),
    "bilinear": ({"resample": 2}, 12, 100, 150, 6),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_video_parity_with_transformers(tmp_path, case):
    overrides, count, height, width, fps = PARITY_CASES[case]
    ours, theirs = both_processors(tmp_path, overrides)
    frames = noise_frames(count, height, width)
    assert_video_parity(ours(videos=[Video(frames, fps=fps)]), reference_outputs(theirs, [(frames, fps)]), case)


def test_several_videos_parity_with_transformers(tmp_path):
    ours, theirs = both_processors(tmp_path, {})
    clips = [(noise_frames(24, 64, 96), 10.0), (noise_frames(9, 300, 500, seed=1), 4.0),
             (noise_frames(5, 40, 40, seed=2), 2.0)]
    got = ours(videos=[Video(frames, fps) for frames, fps in clips])
    assert len(got["video_grid_thw"]) == 3
    assert_video_parity(got, reference_outputs(theirs, clips), "three videos")


def test_decoded_file_parity_with_transformers(av, tmp_path):
    """A file decoded by us equals transformers fed the frames PyAV decodes and the file's fps."""
    ours, theirs = both_processors(tmp_path, {"size": {"shortest_edge": 4096, "longest_edge": 8 * 64 * 96}})
    path = encode_video(av, tmp_path / "clip.mp4", 35, 10, 72, 104)
    frames = np.stack(decode_all(av, path))
    assert_video_parity(ours(videos=str(path)), reference_outputs(theirs, [(frames, 10.0)]), "clip.mp4")


def test_aspect_ratio_above_200_is_rejected_like_the_reference(tmp_path):
    ours, theirs = both_processors(tmp_path, {})
    frames = noise_frames(4, 2, 500)
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200") as ours_error:
        ours(videos=[Video(frames, fps=2)])
    with pytest.raises(ValueError) as reference_error:
        reference_outputs(theirs, [(frames, 2.0)])
    assert str(reference_error.value) in str(ours_error.value)
    assert "videos[0]" in str(ours_error.value)


# --------------------------------------------------------------------------------------------------------
# Sampling, budget, padding and timestamps
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "fps", "height", "width", "codec"),
    [(24, 10, 64, 96, "mpeg4"), (35, 10, 64, 96, "libx264"), (50, 25, 72, 104, "mpeg4")],
)
def test_video_file_sampling_grid_and_timestamps(av, tmp_path, frames, fps, height, width, codec):
    if codec not in av.codecs_available:
        codec = "mpeg4"
    path = encode_video(av, tmp_path / "clip.mp4", frames, fps, height, width, codec)
    processor = VideoProcessor()
    result = processor(videos=[str(path)])

    indices = spec_indices(frames, fps)
    metadata = result["video_metadata"][0]
    assert (metadata.total_num_frames, metadata.fps, metadata.frames_indices) == (frames, fps, indices)
    assert (metadata.height, metadata.width) == (height, width)

    padded = indices + [indices[-1]] * (len(indices) % 2)
    want_times = [(padded[i] / fps + padded[i + 1] / fps) / 2 for i in range(0, len(padded), 2)]
    assert result["video_timestamps"] == [pytest.approx(want_times, abs=1e-12)]

    resized_h, resized_w = smart_resize(height, width, 32, 0, 1 << 40)  # both budgets are far away here
    assert result["video_grid_thw"].tolist() == [[len(padded) // 2, resized_h // 16, resized_w // 16]]
    assert result["pixel_values_videos"].shape == (len(padded) // 2 * resized_h // 16 * resized_w // 16, 1536)

    decoded = decode_all(av, path)
    assert len(decoded) == frames
    raw, raw_metadata = load_video(str(path))
    assert raw_metadata.frames_indices == indices
    for got, index in zip(raw, indices):
        np.testing.assert_array_equal(got, decoded[index])

    # The same frames handed over as a list with their fps give the same result.
    as_frames = processor(videos=[Video(decoded, fps=fps)])
    np.testing.assert_array_equal(as_frames["pixel_values_videos"], result["pixel_values_videos"])
    assert as_frames["video_timestamps"] == result["video_timestamps"]
    as_dict = processor(videos={"frames": [Image.fromarray(f) for f in decoded], "fps": fps})
    np.testing.assert_array_equal(as_dict["pixel_values_videos"], result["pixel_values_videos"])


def test_odd_frame_count_pads_with_the_last_frame(av, tmp_path):
    path = encode_video(av, tmp_path / "odd.mp4", 35, 10, 64, 96)
    result = VideoProcessor()(videos=path)
    assert result["video_metadata"][0].frames_indices == [0, 6, 11, 17, 23, 28, 34]
    assert result["video_timestamps"][0] == pytest.approx([0.3, 1.4, 2.55, 3.4])
    t, gh, gw = result["video_grid_thw"][0]
    assert t == 4
    last = result["pixel_values_videos"].reshape(t, gh * gw, 3, 2, 16, 16)[-1]
    np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])


def test_whole_clip_pixel_budget(av, tmp_path):
    """The budget covers t·h·w: 4 frames of 128x192 under a 4·64·96 budget shrink to 64x96 each."""
    path = encode_video(av, tmp_path / "big.mp4", 8, 4, 128, 192)
    processor = VideoProcessor(max_pixels=4 * 64 * 96)
    result = processor(videos=str(path))
    assert result["video_metadata"][0].frames_indices == [0, 2, 5, 7]
    assert result["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert processor.resized_size(4, 128, 192) == (64, 96)
    # Below the minimum the clip is enlarged, by the frame-count-aware formula.
    small = VideoProcessor(min_pixels=4 * 128 * 192)
    assert small.resized_size(4, 64, 96) == (128, 192)


def test_uniform_frames_normalise_like_torchvision():
    """A grey level x becomes (x - 127.5) / 127.5 in float32 wherever it is resized to (the fused formula)."""
    frames = np.full((4, 40, 300, 3), 200, np.uint8)
    result = VideoProcessor()(videos=Video(frames, fps=2))
    assert result["video_grid_thw"].tolist() == [[2, 2, 18]]  # 40x300 → 32x288
    np.testing.assert_array_equal(result["pixel_values_videos"], (np.float32(200) - 127.5) / np.float32(127.5))


def test_frames_resized_on_threads_keep_their_order(av, tmp_path, monkeypatch):
    """Frames are resized on worker threads with a bounded backlog; the result is the one-thread result."""
    clip = Video(noise_frames(20, 72, 104), fps=4)
    path = encode_video(av, tmp_path / "clip.mp4", 40, 8, 72, 104)
    processor = VideoProcessor(max_pixels=10 * 64 * 96)
    monkeypatch.setattr(video_module, "RESIZE_WORKERS", 1)
    one = [processor(videos=v)["pixel_values_videos"] for v in (clip, str(path))]
    monkeypatch.setattr(video_module, "RESIZE_WORKERS", 3)
    for v, want in zip((clip, str(path)), one):
        got = processor(videos=v)
        assert got["video_grid_thw"].tolist() == [[5, 4, 6]]
        np.testing.assert_array_equal(got["pixel_values_videos"], want)


def test_mlx_outputs():
    video = Video(noise_frames(4, 64, 64), fps=2)
    as_numpy = VideoProcessor()(videos=video)
    as_mlx = VideoProcessor()(videos=video, return_tensors="mlx")
    assert isinstance(as_mlx["pixel_values_videos"], mx.array) and isinstance(as_mlx["video_grid_thw"], mx.array)
    np.testing.assert_array_equal(np.array(as_mlx["pixel_values_videos"]), as_numpy["pixel_values_videos"])
    assert as_mlx["video_timestamps"] == as_numpy["video_timestamps"]


def test_too_many_frames_are_reduced_with_a_warning(av, tmp_path, caplog):
    path = encode_video(av, tmp_path / "long.mp4", 24, 10, 64, 64)
    processor = VideoProcessor(fps=10, max_frames=6)
    with caplog.at_level(logging.WARNING, logger="mlx_qwen36.video"):
        result = processor(videos=str(path))
    assert "exceed max_frames=6" in caplog.text
    assert result["video_metadata"][0].frames_indices == spec_indices(24, 10, fps=10, max_frames=6)
    assert result["video_grid_thw"][0][0] == 3


def test_sampling_formulas():
    assert sample_frame_indices(24, 10).tolist() == [0, 8, 15, 23]
    assert sample_frame_indices(3, 30).tolist() == [0, 1, 2]  # min_frames capped by the frame count
    assert sample_frame_indices(10_000, 1).tolist() == np.linspace(0, 9999, 768).round().astype(int).tolist()
    assert sample_frame_indices(5, 10, fps=None).tolist() == [0, 1, 2, 3, 4]
    assert pair_timestamps([0, 8, 15, 23], 10) == pytest.approx([0.4, 1.9])
    assert pair_timestamps([0, 5, 9], 2) == pytest.approx([1.25, 4.5])


def test_single_frame_video_is_padded():
    frame = noise(64, 64)
    result = VideoProcessor()(videos=Video([frame], fps=1))
    assert result["video_grid_thw"].tolist() == [[1, 4, 4]]
    assert result["video_timestamps"] == [[0.0]]


def test_frames_without_fps_assume_24_with_a_warning(caplog):
    frames = [noise(64, 64, seed=i) for i in range(48)]
    with caplog.at_level(logging.WARNING, logger="mlx_qwen36.video"):
        result = VideoProcessor()(videos=frames)
    assert "assuming 24 fps" in caplog.text
    assert result["video_metadata"][0].frames_indices == spec_indices(48, 24)


# --------------------------------------------------------------------------------------------------------
# Input forms and bad input
# --------------------------------------------------------------------------------------------------------


def test_video_bytes_and_data_url(av, tmp_path):
    path = encode_video(av, tmp_path / "clip.mp4", 24, 10, 64, 96)
    want = VideoProcessor()(videos=str(path))["pixel_values_videos"]
    data = path.read_bytes()
    for form in (data, "data:video/mp4;base64," + base64.b64encode(data).decode()):
        np.testing.assert_array_equal(VideoProcessor()(videos=form)["pixel_values_videos"], want)


def test_zero_frames_is_an_error(av, tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        VideoProcessor()(videos=[Video([], fps=10)])
    path = tmp_path / "empty.avi"
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(ValueError, match=r"empty\.avi.*no frames"):
        VideoProcessor()(videos=[str(path)])


def test_unsupported_codec_is_a_clear_error(av, tmp_path):
    path = encode_video(av, tmp_path / "clip.avi", 8, 10, 64, 64)
    data = path.read_bytes()
    assert data.count(b"FMP4") >= 1  # the AVI FourCC of FFmpeg's MPEG-4 encoder
    unknown = tmp_path / "unknown_codec.avi"
    unknown.write_bytes(data.replace(b"FMP4", b"ZQZQ"))
    with pytest.raises(ValueError, match=r"unknown_codec\.avi.*unsupported video codec"):
        VideoProcessor()(videos=[str(unknown)])


def test_garbage_and_truncated_video_files_are_clear_errors(av, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video " * 20)
    with pytest.raises(ValueError, match=r"garbage\.mp4.*cannot open the video"):
        VideoProcessor()(videos=str(garbage))
    data = encode_video(av, tmp_path / "ok.mp4", 24, 10, 64, 64).read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"truncated\.mp4"):
        VideoProcessor()(videos=str(truncated))
    with pytest.raises(ValueError, match="no video file"):
        VideoProcessor()(videos=str(tmp_path / "absent.mp4"))
    with pytest.raises(ValueError, match=r"\[T, H, W, C\]"):
        VideoProcessor()(videos=np.zeros((4, 4), np.uint8))


def test_unsupported_resample_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"resample=1.*bilinear \(2\) and bicubic \(3\)"):
        VideoProcessor(resample=1)
    folder = write_config(tmp_path, {**RELEASED_VIDEO_CONFIG, "resample": 5}, VIDEO_PREPROCESSOR_CONFIG_FILE)
    with pytest.raises(ValueError, match="resample=5"):
        VideoProcessor.from_pretrained(folder)
    assert VideoProcessor(resample=1, do_resize=False).resample == 1  # never used without resizing


def test_missing_pyav_names_the_extra(monkeypatch, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 100)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(ImportError, match=r"pip install 'mlx-qwen36\[video\]'"):
        VideoProcessor()(videos=str(path))
