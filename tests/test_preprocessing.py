"""Image preprocessing and the vision prompt expansion (ARCHITECTURE.md §7); videos are in test_video.py.

- Images: bit-for-bit parity with transformers 5.24's `Qwen2VLImageProcessorPil` (built from the same
  preprocessor_config.json) over many sizes, extreme aspect ratios, both pixel-budget limits and the PIL modes
  and array layouts users send; the aspect-ratio limit; every input form (path, bytes, data: URL, file:// URL,
  EXIF-rotated JPEG); clear errors for bad inputs.
- Prompt expansion with the real Qwen3.6 tokenizer: exact text and token ids for images and a video, and the
  token ids, pixels and grids of transformers' `Qwen3VLProcessor` for the same messages."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
from conftest import require_video_reference
from media_fixture import RELEASED_IMAGE_CONFIG, RELEASED_VIDEO_CONFIG, noise, noise_frames, write_config
from PIL import Image
from tokenizer_fixture import qwen36_processor_dir_or_skip

from mlx_qwen36.image_processor import ImageProcessor, smart_resize
from mlx_qwen36.processor import Processor, load_processor
from mlx_qwen36.video import Video, VideoProcessor

# A small budget (4-16 merge blocks) so images below the minimum and above the maximum stay cheap.
SMALL_CONFIG = {**RELEASED_IMAGE_CONFIG, "size": {"shortest_edge": 4 * 32 * 32, "longest_edge": 16 * 32 * 32}}

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 248056, 248057, 248053, 248054


# --------------------------------------------------------------------------------------------------------
# Image parity with transformers' PIL backend
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processors(tmp_path_factory) -> dict:
    """{"released"|"small": (ours, transformers')}, both loaded from the same preprocessor_config.json."""
    pytest.importorskip("transformers", reason="transformers is the image-processor parity reference")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = {}
    for name, config in (("released", RELEASED_IMAGE_CONFIG), ("small", SMALL_CONFIG)):
        folder = write_config(tmp_path_factory.mktemp(name), config)
        out[name] = (ImageProcessor.from_pretrained(folder), Qwen2VLImageProcessorPil.from_pretrained(folder))
    return out


def assert_parity(pair, image, reference_input=None, label: str = "") -> dict:
    ours, reference = pair
    got = ours(images=[image])
    want = reference(images=[image if reference_input is None else reference_input])
    assert got["pixel_values"].dtype == np.float32
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert got["image_grid_thw"].tolist() == np.asarray(want["image_grid_thw"]).tolist()
    diff = float(np.abs(got["pixel_values"] - np.asarray(want["pixel_values"])).max())
    assert diff == 0.0, f"{label}: max |ours - transformers| = {diff}"
    return got


# (height, width): ordinary, odd, extreme aspect ratios (up to the 200 limit), tiny, square, large.
RELEASED_SIZES = [
    (300, 500), (32, 3000), (3000, 32), (20, 4000), (1, 150), (17, 33), (100, 100), (257, 385), (1000, 999),
    (2048, 1536), (64, 64),
]
# Under SMALL_CONFIG: above the maximum, below the minimum, exactly on it, extreme ratio with the max active.
SMALL_SIZES = [(500, 700), (700, 500), (20, 30), (8, 8), (64, 64), (128, 128), (10, 1900), (1900, 10), (33, 95)]


@pytest.mark.parametrize(("height", "width"), RELEASED_SIZES)
def test_image_parity_released_config(processors, height, width):
    got = assert_parity(processors["released"], Image.fromarray(noise(height, width)), label=f"{height}x{width}")
    t, gh, gw = got["image_grid_thw"][0]
    resized_h, resized_w = smart_resize(height, width, 32, 65536, 16777216)
    assert (t, gh, gw) == (1, resized_h // 16, resized_w // 16)
    assert got["pixel_values"].shape == (gh * gw, 1536)


@pytest.mark.parametrize(("height", "width"), SMALL_SIZES)
def test_image_parity_small_budget(processors, height, width):
    got = assert_parity(processors["small"], Image.fromarray(noise(height, width)), label=f"small {height}x{width}")
    resized_h, resized_w = smart_resize(height, width, 32, 4 * 32 * 32, 16 * 32 * 32)
    assert got["image_grid_thw"].tolist() == [[1, resized_h // 16, resized_w // 16]]
    if max(height, width) / min(height, width) < 4:  # extreme ratios can end just outside the budget
        assert 4 * 32 * 32 <= resized_h * resized_w <= 16 * 32 * 32


def test_spec_example_300x500():
    got = ImageProcessor()(images=Image.fromarray(noise(300, 500)))
    assert got["image_grid_thw"].tolist() == [[1, 18, 32]]
    assert got["pixel_values"].shape == (576, 1536)
    assert ImageProcessor().num_image_tokens(300, 500) == 144


def _pil_modes() -> dict[str, Image.Image]:
    rgba = Image.fromarray(noise(90, 120, 4), "RGBA")
    palette_transparent = Image.fromarray(noise(90, 120)).convert("P")
    palette_transparent.info["transparency"] = 7
    return {
        "RGBA": rgba,
        "L": rgba.convert("L"),
        "LA": rgba.convert("LA"),
        "P": Image.fromarray(noise(90, 120)).convert("P"),
        "P+transparency": palette_transparent,
        "PA": rgba.convert("PA"),
        "CMYK": Image.fromarray(noise(90, 120, 4), "CMYK"),
        "1": rgba.convert("1"),
        "I": rgba.convert("I"),
        "F": rgba.convert("F"),
        "RGB": rgba.convert("RGB"),
    }


@pytest.mark.parametrize("mode", list(_pil_modes()))
def test_image_parity_pil_modes(processors, mode):
    image = _pil_modes()[mode]
    assert_parity(processors["released"], image, label=f"mode {mode}")
    assert_parity(processors["small"], image, label=f"small mode {mode}")


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    pixels = ImageProcessor(min_pixels=0, max_pixels=64 * 64)(images=clear)["pixel_values"]
    np.testing.assert_array_equal(pixels, 1.0)  # white → (1 - 0.5) / 0.5


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_image_parity_numpy_arrays(processors, channels):
    array = noise(45, 77, channels)
    assert_parity(processors["released"], array, label=f"array HWC{channels}")
    assert_parity(processors["small"], array, label=f"small array HWC{channels}")


def test_grayscale_2d_array_equals_hwc1():
    array = noise(45, 77, 1)
    processor = ImageProcessor()
    flat = processor(images=array[:, :, 0])["pixel_values"]
    np.testing.assert_array_equal(flat, processor(images=array)["pixel_values"])


@pytest.mark.parametrize(("height", "width"), [(1, 201), (201, 1), (10, 2500)])
def test_aspect_ratio_above_200_is_rejected_like_the_reference(processors, height, width):
    ours, reference = processors["released"]
    image = Image.fromarray(noise(height, width))
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200") as ours_error:
        ours(images=[image])
    with pytest.raises(ValueError) as reference_error:
        reference(images=[image])
    assert str(reference_error.value) in str(ours_error.value)
    assert "images[0]" in str(ours_error.value)


def test_several_images_concatenate(processors):
    images = [Image.fromarray(noise(300, 500)), noise(40, 60, 4), Image.fromarray(noise(33, 95)).convert("L")]
    ours, reference = processors["released"]
    got, want = ours(images=images), reference(images=images)
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    assert got["image_grid_thw"].tolist() == np.asarray(want["image_grid_thw"]).tolist()
    assert got["image_grid_thw"].dtype == np.int64


def test_input_forms_agree(tmp_path):
    image = Image.fromarray(noise(70, 110, 4), "RGBA")
    path = tmp_path / "image.png"
    image.save(path)
    data = path.read_bytes()
    processor = ImageProcessor()
    want = processor(images=image)["pixel_values"]
    forms = [
        str(path), path, f"file://{path}", data, bytearray(data),
        "data:image/png;base64," + base64.b64encode(data).decode(),
    ]
    for form in forms:
        np.testing.assert_array_equal(processor(images=form)["pixel_values"], want)


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path, processors):
    pytest.importorskip("transformers", reason="transformers' load_image is the reference")
    from transformers.image_utils import load_image

    image = Image.fromarray(noise(60, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    got = assert_parity(processors["released"], str(path), reference_input=load_image(str(path)), label="EXIF JPEG")
    resized_h, resized_w = smart_resize(100, 60, 32, 65536, 16777216)  # the upright image is 100 high, 60 wide
    assert got["image_grid_thw"].tolist() == [[1, resized_h // 16, resized_w // 16]]


def test_config_file_is_read(tmp_path):
    folder = write_config(tmp_path, {**SMALL_CONFIG, "max_pixels": 8 * 32 * 32, "image_mean": [0.1, 0.2, 0.3]})
    processor = ImageProcessor.from_pretrained(folder)
    assert (processor.min_pixels, processor.max_pixels) == (4 * 32 * 32, 8 * 32 * 32)  # max_pixels overrides size
    assert processor.image_mean == (0.1, 0.2, 0.3)
    defaults = ImageProcessor.from_pretrained(tmp_path / "absent")
    assert (defaults.min_pixels, defaults.max_pixels, defaults.patch_size) == (65536, 16777216, 16)
    assert defaults.resample == Image.Resampling.BICUBIC and math.isclose(defaults.rescale_factor, 1 / 255)


# --------------------------------------------------------------------------------------------------------
# Bad image inputs
# --------------------------------------------------------------------------------------------------------


def _png_bytes(height: int = 64, width: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(height, width)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_truncated_png_file_is_a_clear_error(tmp_path):
    data = _png_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.png.*cannot decode the image"):
        ImageProcessor()(images=[str(path)])
    with pytest.raises(ValueError, match=r"images\[1\].*cannot decode the image"):
        ImageProcessor()(images=[_png_bytes(), data[: len(data) // 2]])


def test_text_file_as_image_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=r"notes\.txt.*cannot decode the image"):
        ImageProcessor()(images=str(path))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((10, 10, 2), np.uint8), r"shape \(10, 10, 2\)"),
        (np.zeros((2, 10, 10, 3), np.uint8), r"shape \(2, 10, 10, 3\)"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        ("/definitely/not/here.png", "no image file"),
        (b"", "empty"),
        ("data:image/png;base64,@@@not base64@@@", "base64"),
        ("https://example.com/cat.png", "remote URLs are not fetched"),
        (12345, "unsupported image input"),
    ],
)
def test_bad_image_inputs_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessor()(images=[bad])


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        ImageProcessor()(images=[])


# --------------------------------------------------------------------------------------------------------
# Prompt expansion with the real tokenizer
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(shared_dir) -> Processor:
    return load_processor(qwen36_processor_dir_or_skip(shared_dir))


MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "file:///a.png"}},
            {"type": "video_url", "video_url": {"url": "file:///b.mp4"}},
            {"type": "text", "text": "What happens?"},
            {"type": "image", "image": "file:///c.png"},
        ],
    }
]


def test_load_processor_attaches_the_media_processors(processor, shared_dir, tmp_path):
    assert isinstance(processor.image_processor, ImageProcessor)
    assert isinstance(processor.video_processor, VideoProcessor)
    assert (processor.image_processor.min_pixels, processor.image_processor.max_pixels) == (65536, 16777216)
    assert (processor.video_processor.min_pixels, processor.video_processor.max_pixels) == (4096, 25165824)
    # A folder's own preprocessor configs are used.
    source = qwen36_processor_dir_or_skip(shared_dir)
    for item in source.iterdir():
        (tmp_path / item.name).symlink_to(item)
    write_config(tmp_path, SMALL_CONFIG)
    video_config = {"size": {"shortest_edge": 1, "longest_edge": 2048}, "fps": 1}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    custom = load_processor(tmp_path)
    assert (custom.image_processor.min_pixels, custom.image_processor.max_pixels) == (4096, 16384)
    assert (custom.video_processor.max_pixels, custom.video_processor.fps) == (2048, 1)


def test_expand_images_and_a_video_exact(processor):
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    images = processor.image_processor(images=[noise(300, 500), noise(64, 64)])
    assert images["image_grid_thw"].tolist() == [[1, 18, 32], [1, 16, 16]]
    frames = [noise(64, 96, seed=i) for i in range(24)]
    video = processor.video_processor(videos=Video(frames, fps=10))
    assert video["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert video["video_timestamps"] == [pytest.approx([0.4, 1.9])]

    expanded = processor.expand_vision_tokens(
        text, images["image_grid_thw"], video["video_grid_thw"], video["video_timestamps"]
    )
    image1 = "<|vision_start|>" + "<|image_pad|>" * 144 + "<|vision_end|>"
    image2 = "<|vision_start|>" + "<|image_pad|>" * 64 + "<|vision_end|>"
    clip = (
        "<0.4 seconds><|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
        "<1.9 seconds><|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
    )
    assert expanded == (
        "<|im_start|>user\n" + image1 + clip + "What happens?" + image2 + "<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )

    ids = processor.encode(expanded)
    assert ids.count(IMAGE_PAD) == 144 + 64 and ids.count(VIDEO_PAD) == 12
    start = ids.index(VIDEO_PAD) - 1 - 6  # "<0.4 seconds>" is 6 tokens, then <|vision_start|>
    assert [processor.decode([i]) for i in ids[start : start + 6]] == ["<", "0", ".", "4", " seconds", ">"]
    assert ids[start : start + 28] == (
        [27, 15, 13, 19, 6283, 29, VISION_START] + [VIDEO_PAD] * 6 + [VISION_END]
        + [27, 16, 13, 24, 6283, 29, VISION_START] + [VIDEO_PAD] * 6 + [VISION_END]
    )
    # The id-level expansion of the template's ids gives the same tokens.
    assert processor.expand_vision_tokens(
        processor.encode(text), images["image_grid_thw"], video["video_grid_thw"], video["video_timestamps"]
    ) == ids


def test_expansion_errors(processor):
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    grids = [[1, 4, 4], [1, 2, 2]]
    video = ([[2, 4, 6]], [[0.4, 1.9]])
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        processor.expand_vision_tokens(text, grids[:1], *video)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 3 images"):
        processor.expand_vision_tokens(text, grids + [[1, 2, 2]], *video)
    with pytest.raises(ValueError, match="placeholders but 0 videos"):
        processor.expand_vision_tokens(text, grids, None, None)
    with pytest.raises(ValueError, match="video_timestamps are required"):
        processor.expand_vision_tokens(text, grids, video[0], None)
    with pytest.raises(ValueError, match="2 temporal pairs but video_timestamps has 1"):
        processor.expand_vision_tokens(text, grids, video[0], [[0.4]])
    with pytest.raises(ValueError, match="outside a"):
        processor.expand_vision_tokens("look <|video_pad|>", None, video[0], video[1])
    with pytest.raises(ValueError, match="not a valid grid"):
        processor.expand_vision_tokens("<|image_pad|>", [[1, 3, 4]])
    with pytest.raises(ValueError, match="placeholders but 1 images"):
        processor.expand_vision_tokens(processor.encode("<|image_pad|><|image_pad|>"), [[1, 2, 2]])
    # A prompt expanded once cannot be expanded again.
    once = processor.expand_vision_tokens("<|image_pad|>", [[1, 2, 2]])
    with pytest.raises(ValueError):
        processor.expand_vision_tokens(once + "<|image_pad|>", [[1, 2, 2]])
    assert processor.expand_vision_tokens("no media here") == "no media here"


def test_processor_matches_transformers_qwen3vl_processor(processor, shared_dir, tmp_path):
    """Two images and a video through our processors and expansion, and through transformers' `Qwen3VLProcessor`
    (PIL image processor, torchvision video processor) on the same rendered prompt: the same pixels, grids and
    token ids, but for one difference of transformers 5.24. It replaces only the `<|video_pad|>` of the template's
    `<|vision_start|><|video_pad|><|vision_end|>`, so the clip's frames sit inside an extra start/end pair; we
    replace the whole triple, as the Qwen3-VL reference processor and vLLM do."""
    require_video_reference()
    from transformers import AutoTokenizer, Qwen3VLProcessor, Qwen3VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.video_utils import VideoMetadata

    folder = write_config(tmp_path, RELEASED_IMAGE_CONFIG)
    write_config(folder, {**RELEASED_VIDEO_CONFIG, "cap_pixels_per_frame": False}, "video_preprocessor_config.json")
    theirs = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
                              tokenizer=AutoTokenizer.from_pretrained(qwen36_processor_dir_or_skip(shared_dir)),
                              video_processor=Qwen3VLVideoProcessor.from_pretrained(folder))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Why?"},
                                             {"type": "image"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.fromarray(noise(300, 500)), Image.fromarray(noise(64, 64, seed=1))]
    frames = noise_frames(24, 64, 96)
    want = theirs(text=[text], images=images, videos=[frames], return_tensors="np",
                  video_metadata=[VideoMetadata(total_num_frames=24, fps=10, height=64, width=96)])

    image_out = processor.image_processor(images=images)
    video_out = processor.video_processor(videos=Video(frames, fps=10))
    for key, value in [*image_out.items(), *((k, video_out[k]) for k in ("pixel_values_videos", "video_grid_thw"))]:
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    ids = processor.encode(processor.expand_vision_tokens(
        text, image_out["image_grid_thw"], video_out["video_grid_thw"], video_out["video_timestamps"]))

    first, last = ids.index(VIDEO_PAD), len(ids) - 1 - ids[::-1].index(VIDEO_PAD)
    clip_start = first - 1 - 6  # "<0.4 seconds>" is 6 tokens, then <|vision_start|>
    nested = ids[:clip_start] + [VISION_START] + ids[clip_start:last + 2] + [VISION_END] + ids[last + 2:]
    assert want["input_ids"][0].tolist() == nested
    # The token types transformers' positions use are the ones ours derive from the ids.
    assert want["mm_token_type_ids"][0].tolist() == [1 if i == IMAGE_PAD else 2 if i == VIDEO_PAD else 0
                                                     for i in nested]
