"""Image preprocessing for the Qwen3.6 vision tower, with Pillow and NumPy only.

The output is equal to transformers 5.24's `Qwen2VLImageProcessorPil` (the PIL backend of the class named in
the released `preprocessor_config.json`) configured with the same file; `tests/test_preprocessing.py` checks it
bit for bit. The steps (ARCHITECTURE.md §7):

1. Convert to RGB. Images with transparency (an alpha band, or a palette/`transparency` entry) are
   composited onto white, as transformers' `convert_to_rgb` does: with `Image.alpha_composite` for PIL input,
   with `round(a·rgb + (1-a)·255)` for RGBA arrays. L, P, CMYK, … go through `Image.convert("RGB")`.
2. `smart_resize` to multiples of `patch_size·merge_size` (32) within `[min_pixels, max_pixels]`; aspect
   ratios above 200 are rejected with the reference's message.
3. Resize with Pillow (`Image.resize`, bicubic by default), exactly the call transformers makes.
4. Rescale and normalise: `float32(float64(x)·rescale_factor)`, then `(x - mean) / std` in float32 (done with a
   256-entry lookup table per channel, which gives the same floats at a fraction of the cost).
5. Repeat the image to `temporal_patch_size` (2) frames and cut it into patches, rows ordered
   `(t, h/2, w/2, mh, mw)` and each row laid out `(C, tp, py, px)`: `[N, 3·2·16·16 = 1536]` float32.

Inputs: PIL images, file paths (`str`/`Path`, also `file://` URLs), encoded bytes, `data:` URLs with base64
payloads, and uint8 NumPy arrays `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)` (channels last). Images read
from files, bytes or data URLs get their EXIF orientation applied first, as transformers' `load_image` does; PIL
images passed in are used as they are. Remote `http(s)://` URLs are not fetched. Any input that cannot be read
raises ValueError naming it.

`load_image`, `to_rgb_array`, `normalize_to_float` and `patchify` are shared with `mlx_qwen36.video`; videos are
resized with `mlx_qwen36.resample` instead of Pillow and normalised in the fused form of transformers' torchvision
backend, as its video processor does.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, unquote_to_bytes, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageProcessor",
    "as_tensors",
    "load_image",
    "normalize_to_float",
    "patchify",
    "resize_rgb",
    "smart_resize",
    "to_rgb_array",
]

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
MAX_ASPECT_RATIO = 200
BICUBIC = int(Image.Resampling.BICUBIC)

ImageInput = Any  # PIL.Image.Image | str | os.PathLike | bytes | np.ndarray


# --------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------


def smart_resize(
    height: int, width: int, factor: int = 32, min_pixels: int = 65536, max_pixels: int = 16777216
) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible. A copy of transformers' `qwen2_vl` `smart_resize`.

    Raises ValueError("absolute aspect ratio must be smaller than 200, got …") like the reference.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} (width x height)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# --------------------------------------------------------------------------------------------------------


def _describe(source: Any, limit: int = 80) -> str:
    """A short, printable name for an input, for error messages."""
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("data:"):
            return f"data URL {text[:40]!r}… ({len(text)} chars)"
        return repr(text if len(text) <= limit else text[:limit] + "…")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes"
    if isinstance(source, np.ndarray):
        return f"array of shape {source.shape} and dtype {source.dtype}"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    return type(source).__name__


def decode_data_url(url: str, name: str) -> bytes:
    """The payload of a `data:[<mediatype>][;base64],<data>` URL (base64 or percent-encoded)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"{name}: malformed data URL (no ',' separating the header from the data)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{name}: the data URL's base64 payload does not decode ({exc})") from exc
    return unquote_to_bytes(payload)


def read_source_bytes(source: str | Path, name: str, kind: str) -> bytes | Path:
    """A path-like or string source → bytes (data URLs) or an existing file's Path. `kind` is "image"/"video"."""
    text = str(source)
    if isinstance(source, str):
        if text.startswith("data:"):
            return decode_data_url(text, name)
        if text.startswith(("http://", "https://")):
            raise ValueError(f"{name}: remote URLs are not fetched; download the {kind} and pass its path or bytes")
        if text.startswith("file://"):
            text = unquote(urlparse(text).path)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{name}: no {kind} file at {str(path)!r}")
    return path


def load_image(source: ImageInput, name: str | None = None) -> Image.Image | np.ndarray:
    """Open one image input. PIL images are returned unchanged; arrays are validated and returned as arrays;
    paths, bytes and data URLs are decoded fully (so truncated files fail here) and EXIF-transposed.

    Raises ValueError naming the input when it cannot be read.
    """
    name = name or _describe(source)
    if isinstance(source, Image.Image):
        try:
            source.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"{name}: cannot decode the image ({exc})") from exc
        return source
    if isinstance(source, np.ndarray):
        return _check_array(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data: bytes | Path = bytes(source)
    elif isinstance(source, (str, Path)):
        data = read_source_bytes(source, name, "image")
    else:
        raise ValueError(
            f"{name}: unsupported image input; give a PIL image, a path, bytes, a data: URL or a uint8 array"
        )
    if isinstance(data, bytes) and not data:
        raise ValueError(f"{name}: the image data is empty")
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name}: cannot decode the image ({type(exc).__name__}: {exc})") from exc
    return image


def _check_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: image arrays must be uint8 (0-255), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name}: image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) channels-last, "
            f"got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: the image is empty (shape {array.shape})")
    return array


def to_rgb_array(image: Image.Image | np.ndarray, name: str = "image") -> np.ndarray:
    """RGB uint8 `(H, W, 3)`, converted exactly like transformers' `convert_to_rgb` (alpha over white)."""
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name}: the image is empty ({image.width}x{image.height})")
        try:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{name}: cannot convert the {image.mode} image to RGB ({exc})") from exc
        return np.asarray(rgb, dtype=np.uint8)
    array = _check_array(np.asarray(image), name)
    channels = array.shape[2]
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 4:
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------------------------------------
# Pixel transforms
# --------------------------------------------------------------------------------------------------------


def resize_rgb(rgb: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """Resize an RGB uint8 array with Pillow, as transformers' `image_transforms.resize` does."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb  # Pillow returns an identical copy in this case
    resized = Image.fromarray(rgb).resize((width, height), resample=resample)
    return np.asarray(resized, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class _Normalizer:
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    fused: bool = False

    def table(self) -> np.ndarray:
        """[3, 256] float32: the value each uint8 level maps to, per channel, with the reference's rounding.

        Unfused (transformers' PIL/NumPy backend): `float32(float64(x)·rescale)`, then `(x - mean) / std` in float32.
        Fused (its torchvision backend, which video goes through): one `(x - mean/rescale) / (std/rescale)` in
        float32, the folded mean and std rounded to float32 first.
        """
        levels = np.arange(256, dtype=np.float64)[None, :].repeat(3, axis=0)
        if self.fused and self.rescale_factor is not None and self.mean is not None:
            inverse = np.float32(1.0 / self.rescale_factor)
            mean = np.asarray(self.mean, dtype=np.float32)[:, None] * inverse
            std = np.asarray(self.std, dtype=np.float32)[:, None] * inverse
            return (levels.astype(np.float32) - mean) / std
        if self.rescale_factor is None:
            values = levels.astype(np.float32)
        elif self.fused:
            values = levels.astype(np.float32) * np.float32(self.rescale_factor)  # a float32 tensor product
        else:
            values = (levels * self.rescale_factor).astype(np.float32)  # np_rescale: float64 product → float32
        if self.mean is not None:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None]
            values = (values - mean) / std  # float32 arithmetic
        return values.astype(np.float32)


def normalize_to_float(
    rgb: np.ndarray,
    rescale_factor: float | None = 1 / 255,
    mean: Sequence[float] | None = (0.5, 0.5, 0.5),
    std: Sequence[float] | None = (0.5, 0.5, 0.5),
    fused: bool = False,
) -> np.ndarray:
    """uint8 `(..., 3)` → float32 `(..., 3)`: `(float32(x·rescale) - mean) / std`, None skips a step; `fused`
    rounds like transformers' torchvision backend instead (see `_Normalizer.table`)."""
    table = _Normalizer(
        rescale_factor, None if mean is None else tuple(mean), None if std is None else tuple(std), fused
    ).table()
    if (table == table[0]).all():  # one lookup over contiguous memory when the channels share mean and std
        return np.take(table[0], rgb)
    out = np.empty(rgb.shape, dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], rgb[..., channel], out=out[..., channel])
    return out


def patchify(frames: np.ndarray, patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2):
    """Frames `[T, H, W, C]` (T a multiple of temporal_patch_size) → `([T/tp·H/p·W/p, C·tp·p·p], (gt, gh, gw))`.

    Rows follow `(t, h/merge, w/merge, mh, mw)`, so each run of merge² rows is one merge block; each row is
    laid out `(C, tp, py, px)`, the order of the Conv3d patch embedding's weight.
    """
    t, height, width, channels = frames.shape
    if t % temporal_patch_size:
        raise ValueError(f"frame count {t} is not a multiple of temporal_patch_size {temporal_patch_size}")
    block = patch_size * merge_size
    if height % block or width % block:
        raise ValueError(f"frame size {width}x{height} is not a multiple of patch_size·merge_size = {block}")
    gt, gh, gw = t // temporal_patch_size, height // patch_size, width // patch_size
    patches = frames.reshape(
        gt, temporal_patch_size, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size,
        channels,
    )
    # (gt, tp, bh, mh, py, bw, mw, px, C) → (gt, bh, bw, mh, mw, C, tp, py, px)
    patches = patches.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    flat = np.ascontiguousarray(patches).reshape(gt * gh * gw, channels * temporal_patch_size * patch_size**2)
    return flat, (gt, gh, gw)


def as_tensors(outputs: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    """transformers' `return_tensors`: None or "np" keeps the NumPy arrays, "mlx" turns them into `mx.array`."""
    if return_tensors in (None, "np"):
        return outputs
    if return_tensors != "mlx":
        raise ValueError(f"return_tensors must be None, 'np' or 'mlx', got {return_tensors!r}")
    import mlx.core as mx

    return {key: mx.array(value) if isinstance(value, np.ndarray) else value for key, value in outputs.items()}


# --------------------------------------------------------------------------------------------------------
# Configuration helpers shared with the video processor
# --------------------------------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def pixel_budget(config: Mapping[str, Any], default_min: int, default_max: int, source: str) -> tuple[int, int]:
    """(min_pixels, max_pixels) from `size {shortest_edge, longest_edge}`, overridden by top-level
    `min_pixels`/`max_pixels` as transformers' Qwen2-VL `__init__` does."""
    size = config.get("size") or {}
    if not isinstance(size, Mapping):
        raise ValueError(f"{source}: 'size' should be an object with shortest_edge/longest_edge, got {size!r}")
    min_pixels = size.get("shortest_edge", size.get("min_pixels", default_min))
    max_pixels = size.get("longest_edge", size.get("max_pixels", default_max))
    if config.get("min_pixels") is not None:
        min_pixels = config["min_pixels"]
    if config.get("max_pixels") is not None:
        max_pixels = config["max_pixels"]
    return int(min_pixels), int(max_pixels)


def config_kwargs(config: Mapping[str, Any], fields: Sequence[str]) -> dict:
    kwargs = {key: config[key] for key in fields if config.get(key) is not None}
    for key in ("image_mean", "image_std"):
        if key in kwargs and not isinstance(kwargs[key], (list, tuple)):
            kwargs[key] = [kwargs[key]] * 3
    return kwargs


def validate_common(obj: Any) -> None:
    """Checks shared by ImageProcessor and VideoProcessor (called from their __post_init__)."""
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        value = getattr(obj, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if obj.min_pixels < 0 or obj.max_pixels <= 0 or obj.min_pixels > obj.max_pixels:
        raise ValueError(f"need 0 <= min_pixels <= max_pixels, got {obj.min_pixels} and {obj.max_pixels}")
    obj.image_mean = tuple(float(v) for v in obj.image_mean)
    obj.image_std = tuple(float(v) for v in obj.image_std)
    if len(obj.image_mean) != 3 or len(obj.image_std) != 3 or 0.0 in obj.image_std:
        raise ValueError(
            f"image_mean and image_std need 3 values (std non-zero), got {obj.image_mean} and {obj.image_std}"
        )
    obj.resample = int(obj.resample)


# --------------------------------------------------------------------------------------------------------
# The image processor
# --------------------------------------------------------------------------------------------------------

_IMAGE_FIELDS = (
    "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor", "resample",
    "do_resize", "do_rescale", "do_normalize",
)


@dataclasses.dataclass
class FromConfig:
    """What the image and video processors share: the pixel budget and patch/normalisation fields, and loading
    them with `from_dict` / `from_pretrained` (each subclass names its config file and fields)."""

    CONFIG_FILE: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]
    min_pixels: int = 65536  # size.shortest_edge
    max_pixels: int = 16777216  # size.longest_edge
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str | None = None) -> Any:
        """From a config mapping; unknown keys (processor_class, …) are ignored."""
        min_pixels, max_pixels = pixel_budget(config, cls.min_pixels, cls.max_pixels, source or cls.CONFIG_FILE)
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **config_kwargs(config, cls.FIELDS))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Any:
        """From `folder/<CONFIG_FILE>`, or the released defaults when the file is absent."""
        path = Path(folder).expanduser() / cls.CONFIG_FILE
        return cls.from_dict(read_config_file(path), str(path)) if path.is_file() else cls()


@dataclasses.dataclass
class ImageProcessor(FromConfig):
    """Qwen3.6 image preprocessing; defaults are the released `preprocessor_config.json` values.

    `processor(images=[...])` → `{"pixel_values": float32 [N, 1536], "image_grid_thw": int64 [n, 3]}`, the
    outputs of transformers' `Qwen2VLImageProcessorPil` with the same configuration. Build it from a
    checkpoint folder with `ImageProcessor.from_pretrained(folder)` or from a config dict with `from_dict`.
    """

    CONFIG_FILE: ClassVar[str] = PREPROCESSOR_CONFIG_FILE
    FIELDS: ClassVar[tuple[str, ...]] = _IMAGE_FIELDS

    def __post_init__(self) -> None:
        validate_common(self)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after `smart_resize` (unchanged when do_resize is off)."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """The `image_grid_thw` row for an image of this size."""
        resized_h, resized_w = self.resized_size(height, width)
        return 1, resized_h // self.patch_size, resized_w // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """How many `<|image_pad|>` tokens an image of this size becomes."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // self.merge_size**2

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        return normalize_to_float(
            rgb,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )

    def process_rgb(self, rgb: np.ndarray, size: tuple[int, int] | None = None, name: str = "image") -> np.ndarray:
        """RGB uint8 `(H, W, 3)` → normalised float32 `(H', W', 3)` at `size` (default: `smart_resize`)."""
        height, width = rgb.shape[:2]
        try:
            target = size or self.resized_size(height, width)
        except ValueError as exc:
            raise ValueError(f"{name} ({width}x{height}): {exc}") from exc
        if target[0] <= 0 or target[1] <= 0:
            raise ValueError(f"{name} ({width}x{height}) resizes to an empty image; raise min_pixels")
        rgb = resize_rgb(rgb, target[0], target[1], self.resample) if target != (height, width) else rgb
        return self.normalize(rgb)

    def preprocess_one(self, image: ImageInput, name: str | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image → (`[h·w, 1536]` patches, `(1, h, w)` grid)."""
        name = name or _describe(image)
        rgb = to_rgb_array(load_image(image, name), name)
        pixels = self.process_rgb(rgb, name=name)
        frames = np.broadcast_to(pixels[None], (self.temporal_patch_size, *pixels.shape))
        try:
            patches, grid = patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} (do_resize is off)") from exc
        return patches, grid

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], return_tensors: str | None = None
    ) -> dict[str, Any]:
        """Images → `{"pixel_values": float32 [N, C·tp·p·p], "image_grid_thw": int64 [n, 3]}`.

        `images` is one image or a list of them (PIL images, paths, bytes, data: URLs, uint8 arrays). The arrays
        are NumPy, or `mx.array` with `return_tensors="mlx"`.
        """
        if isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("no images given")
        all_patches, grids = [], []
        for index, image in enumerate(items):
            name = f"images[{index}] ({_describe(image)})"
            patches, grid = self.preprocess_one(image, name)
            all_patches.append(patches)
            grids.append(grid)
        outputs = {
            "pixel_values": np.concatenate(all_patches, axis=0),
            "image_grid_thw": np.asarray(grids, dtype=np.int64),
        }
        return as_tensors(outputs, return_tensors)

    preprocess = __call__
