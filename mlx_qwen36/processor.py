"""Text processor for Qwen3.6: tokenizer, chat template and stop ids, read from a checkpoint folder.

The prompt the model sees must be byte-for-byte what transformers' `apply_chat_template` produces, because
that is what the model was trained and evaluated against. We get there without importing transformers at
runtime: the `tokenizers` library loads `tokenizer.json` as-is, and the chat template is rendered in a jinja2
sandbox configured exactly like transformers' (`utils/chat_template_utils.py`, `_compile_jinja_template`),
with the same message clean-up beforehand.

Messages are accepted in OpenAI Chat Completions form (content parts, `image_url`/`video_url`, tool calls
whose `arguments` is a JSON string) and normalised into the shapes the Qwen template reads;
`normalize_messages` keeps the image/video references in order. Pixels are prepared by
`Processor.image_processor` (`mlx_qwen36.image_processor.ImageProcessor`) and `Processor.video_processor`
(`mlx_qwen36.video.VideoProcessor`), and `Processor.expand_vision_tokens` turns the one placeholder the template
writes per image/video into the tokens the vision tower's outputs fill.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from mlx_qwen36.image_processor import ImageProcessor
from mlx_qwen36.video import VideoProcessor

__all__ = [
    "ChatTemplateError",
    "Processor",
    "load_processor",
    "normalize_messages",
    "render_chat_template",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# The named special tokens transformers passes to every template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Other names clients use for a message's reasoning; transformers copies them to `reasoning_content`.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# Vision placeholders (ARCHITECTURE.md §7): the template writes VISION_START + IMAGE_TOKEN|VIDEO_TOKEN + VISION_END.
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (its `raise_exception`) or failed to render it.

    A ValueError, so servers can answer it as a bad request; the message is the template's own text.
    """


# --------------------------------------------------------------------------------------------------------
# Jinja environment, configured like transformers 5.x `_compile_jinja_template`
# --------------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}…{% endgeneration %}` like transformers does; we render the body unchanged.

    transformers uses the tag only to compute assistant-token masks for training, which we do not need, but a
    template that contains it must still parse and render the same text.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # transformers replaces jinja's tojson: no HTML escaping, non-ASCII kept, and `json.dumps` spacing.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """A `dict` global that only builds dicts, so templates cannot reach the type object."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace`, refusing underscore-prefixed attributes (a sandbox hardening from transformers)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as jinja's Namespace, so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}."
            )


@lru_cache(maxsize=16)
def _compile_template(chat_template: str) -> jinja2.Template:
    """Compile once per template text; errors in the template itself surface as ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc


# --------------------------------------------------------------------------------------------------------
# Message normalisation
# --------------------------------------------------------------------------------------------------------


def _plain_data(value: Any) -> Any:
    """A fresh copy built from JSON types only, as transformers' `_plain_template_data` does.

    The sandbox does not know which methods of rich objects (images, arrays) are dangerous, and templates only
    test whether media keys are present, so anything else becomes an inert `<TypeName>` placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(key): _plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. OpenAI SDK messages
        return _plain_data(value.model_dump())
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain_data(value.item())
    return f"<{type(value).__name__}>"


def _as_dict(message: Any, index: int) -> dict:
    if isinstance(message, Mapping):
        return dict(message)
    if callable(getattr(message, "model_dump", None)):
        return dict(message.model_dump())
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return {field.name: getattr(message, field.name) for field in dataclasses.fields(message)}
    raise TypeError(f"messages[{index}] should be a dict, got {type(message).__name__}")


def _media_ref(part: Mapping, key: str) -> Any:
    """The URL (or object) an OpenAI `image_url`/`video_url` part points at: `{"url": …}` or a bare value."""
    value = part.get(key)
    if isinstance(value, Mapping) and "url" in value:
        return value["url"]
    return value


def _normalize_part(part: Any) -> Any:
    """Map one OpenAI content part to the form Qwen's `render_content` macro recognises.

    The template treats a part with an `image`/`image_url` key or `type == "image"` as an image and one with a
    `video` key or `type == "video"` as a video. OpenAI's `video_url` parts match neither, so every media part is
    rewritten to `{"type": "image"|"video", "image"|"video": <url or object>}`; other keys are kept.
    """
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        return part
    part = dict(part)
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        ref = _media_ref(part, "image_url")
        part.pop("image_url", None)
        part.update(type="image", image=ref)
    elif kind == "video_url" or (kind is None and "video_url" in part):
        ref = _media_ref(part, "video_url")
        part.pop("video_url", None)
        part.update(type="video", video=ref)
    return part


def _decode_arguments(arguments: str, index: int, call_index: int) -> dict:
    """Turn OpenAI's JSON-string `arguments` into the mapping the template iterates with `|items`."""
    if not arguments.strip():
        return {}  # some clients send "" for a call without parameters
    try:
        decoded = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"messages[{index}].tool_calls[{call_index}].function.arguments is not valid JSON ({exc.msg}): "
            f"{arguments[:200]!r}"
        ) from exc
    if not isinstance(decoded, dict):
        raise ValueError(
            f"messages[{index}].tool_calls[{call_index}].function.arguments must be a JSON object, "
            f"got {type(decoded).__name__}"
        )
    return decoded


def _normalize_tool_call(call: Any, index: int, call_index: int) -> Any:
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    holder = call
    if isinstance(call.get("function"), Mapping):
        holder = call["function"] = dict(call["function"])
    if isinstance(holder.get("arguments"), str):
        holder["arguments"] = _decode_arguments(holder["arguments"], index, call_index)
    return call


def _alias_reasoning(message: dict) -> dict:
    """Copy `thinking`/`reasoning` to `reasoning_content` (and back to `thinking`), as transformers does.

    mlx-lm answers with `reasoning`, vLLM with `reasoning_content`; either must come back as the reasoning the
    template re-renders.
    """
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _normalize_message(message: Any, index: int) -> dict:
    message = {key: value for key, value in _as_dict(message, index).items() if value is not None}
    content = message.get("content")
    if isinstance(content, (list, tuple)):
        message["content"] = [_normalize_part(part) for part in content]
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, (list, tuple)):
        message["tool_calls"] = [_normalize_tool_call(call, index, i) for i, call in enumerate(tool_calls)]
    return _alias_reasoning(message)


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """OpenAI-style messages → the message dicts the Qwen template reads; the caller's objects are not changed.

    - keys whose value is None are dropped (OpenAI sends `content: null` next to `tool_calls`, which templates
      would otherwise render as "None");
    - content parts: `image_url`/`video_url` → `{"type": "image", "image": url}` / `{"type": "video", ...}`,
      bare strings → text parts; media objects themselves are kept for a later image processor;
    - `tool_calls[*].function.arguments` given as a JSON string is decoded to a dict (ValueError naming the
      message otherwise);
    - `reasoning`/`thinking` are aliased to `reasoning_content`.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages should be a list of message dicts, got {type(messages).__name__}")
    return [_normalize_message(message, i) for i, message in enumerate(messages)]


def _normalize_tools(tools: Sequence[Any] | None) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, Mapping) or not isinstance(tools, Sequence):
        raise TypeError(f"tools should be a list of OpenAI tool schemas, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise TypeError(f"tools[{i}] should be a JSON-schema dict, got {type(tool).__name__}")
    return list(tools)


def render_chat_template(
    chat_template: str,
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with `chat_template` the way transformers' `apply_chat_template(tokenize=False)` does.

    The template sees `messages`, `tools`, `documents` (None), `add_generation_prompt`, the named special
    tokens (`bos_token`, `eos_token`, …) and `template_kwargs` (which override special tokens of the same name).
    Raises ChatTemplateError carrying the template's message when it refuses the conversation.
    """
    if not messages:
        raise ValueError("Cannot apply the chat template to an empty conversation; give at least one message.")
    compiled = _compile_template(chat_template)
    variables = _plain_data({**(special_tokens or {}), **template_kwargs})
    try:
        return compiled.render(
            messages=_plain_data(normalize_messages(messages)),
            tools=_plain_data(_normalize_tools(tools)),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except ChatTemplateError:
        raise
    except (jinja2.exceptions.TemplateError, TypeError) as exc:
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------


class Processor:
    """Qwen3.6 processor: tokenizer + chat template + stop ids, plus the image and video preprocessors.
    Build it with `load_processor`.

    `image_processor` (`ImageProcessor`) and `video_processor` (`VideoProcessor`) turn media into pixel
    patches and grids; `expand_vision_tokens` then expands the single `<|image_pad|>` /
    `<|vision_start|><|video_pad|><|vision_end|>` the template emits per item to match them.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        eos_token_ids: Sequence[int],
        special_tokens: Mapping[str, str] | None = None,
        image_processor: Any | None = None,
        generation_config: Mapping[str, Any] | None = None,
        video_processor: Any | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        self.chat_template = chat_template
        self.eos_token_ids: list[int] = list(eos_token_ids)
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.image_processor = image_processor
        self.video_processor = video_processor
        _compile_template(chat_template)  # surface template syntax errors at load time

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (248,077 for Qwen3.6).

        This is transformers' `len(tokenizer)`, not its `vocab_size` (base BPE only). The model's embedding is
        padded beyond it (248,320).
        """
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens.get("pad_token")
        return None if pad is None else self.tokenizer.token_to_id(pad)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it map to their single ids. Qwen adds no BOS."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. `<think>`, `<tool_call>` etc. are not special, so they survive `skip_special_tokens`."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """transformers-style lookup: a token string → its id (None if unknown), a list → a list."""
        if isinstance(tokens, str):
            return self.tokenizer.token_to_id(tokens)
        return [self.tokenizer.token_to_id(token) for token in tokens]

    def token_id(self, token: str) -> int:
        """The id of a single vocabulary token such as `"<think>"`; KeyError if the vocabulary lacks it."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        enable_thinking: bool = True,
        preserve_thinking: bool = False,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render an OpenAI-style conversation into the model prompt: token ids, or the text if not `tokenize`.

        Equal to transformers' `apply_chat_template(messages, tools=tools, enable_thinking=…,
        preserve_thinking=…, add_generation_prompt=…)` with the same files. Unlike transformers,
        `add_generation_prompt` defaults to True, since serving a prompt is the common case here.
        """
        text = render_chat_template(
            self.chat_template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            enable_thinking=enable_thinking,
            preserve_thinking=preserve_thinking,
            **template_kwargs,
        )
        return self.encode(text) if tokenize else text

    def expand_vision_tokens(
        self,
        prompt: str | Sequence[int],
        image_grid_thw: Any = None,
        video_grid_thw: Any = None,
        video_timestamps: Sequence[Sequence[float]] | None = None,
    ) -> str | list[int]:
        """Expand the vision placeholders of a rendered prompt to the number of tokens the vision tower fills.

        `prompt` is the chat template's text (`apply_chat_template(..., tokenize=False)`), or its token ids.
        Returns the same kind: text (tokenize it with `encode`) or a list of ids. Placeholders are taken in
        order and matched to the media in order:

        - each `<|image_pad|>` becomes `prod(image_grid_thw[i]) / merge²` copies of itself;
        - each whole `<|vision_start|><|video_pad|><|vision_end|>` becomes, for every temporal pair k of video j,
          `<{video_timestamps[j][k]:.1f} seconds><|vision_start|>` + `<|video_pad|>` × (h·w/merge²) +
          `<|vision_end|>` (the Qwen3-VL reference and vLLM; ARCHITECTURE.md §7).

        `image_grid_thw` / `video_grid_thw` are `[n, 3]` (the processors' outputs) and `video_timestamps` their
        `video_timestamps` (one list of seconds per video, one entry per temporal pair).

        Expanding text and then encoding it is what the Qwen3-VL reference does; it is the recommended path.
        For ids, each timestamp is encoded on its own (as a token-level replacement such as vLLM's does); the
        two agree whenever a special token precedes each video placeholder, which the Qwen template ensures
        unless text or `add_vision_id`'s `Video n: ` prefix runs straight into it.

        Raises ValueError when placeholders and media do not pair up one to one (either way), on a
        `<|video_pad|>` outside the three-token video placeholder, and on malformed grids or timestamps.
        """
        images = _grid_rows(image_grid_thw, "image_grid_thw")
        videos = _grid_rows(video_grid_thw, "video_grid_thw")
        image_merge = getattr(self.image_processor, "merge_size", 2)
        video_merge = getattr(self.video_processor, "merge_size", 2)
        image_counts = [_tokens_per_grid(grid, image_merge, f"image_grid_thw[{i}]") for i, grid in enumerate(images)]
        video_frames = []  # per video: [(timestamp, pads per frame), ...]
        stamps = list(video_timestamps) if video_timestamps is not None else []
        if videos and video_timestamps is None:
            raise ValueError("video_timestamps are required to expand videos (the VideoProcessor returns them)")
        if len(stamps) != len(videos):
            raise ValueError(f"got {len(videos)} video grids but {len(stamps)} lists of video_timestamps")
        for j, grid in enumerate(videos):
            per_frame = _tokens_per_grid((1, grid[1], grid[2]), video_merge, f"video_grid_thw[{j}]")
            times = [float(t) for t in stamps[j]]
            if len(times) != grid[0]:
                raise ValueError(
                    f"video {j}: video_grid_thw has {grid[0]} temporal pairs but video_timestamps has {len(times)}"
                )
            video_frames.append([(t, per_frame) for t in times])

        if isinstance(prompt, str):
            return _expand_text(prompt, image_counts, video_frames)
        ids = [int(i) for i in (prompt.tolist() if isinstance(prompt, np.ndarray) else prompt)]
        return self._expand_ids(ids, image_counts, video_frames)

    def _expand_ids(self, ids: list[int], image_counts: list[int], video_frames: list[list[tuple[float, int]]]):
        image_id, video_id = self.token_id(IMAGE_TOKEN), self.token_id(VIDEO_TOKEN)
        start_id, end_id = self.token_id(VISION_START), self.token_id(VISION_END)
        _check_placeholder_counts(
            ids.count(image_id),
            sum(1 for i in range(len(ids) - 2) if ids[i : i + 3] == [start_id, video_id, end_id]),
            ids.count(video_id),
            len(image_counts),
            len(video_frames),
        )
        out: list[int] = []
        n_image = n_video = 0
        i = 0
        while i < len(ids):
            token = ids[i]
            if token == image_id:
                out.extend([image_id] * image_counts[n_image])
                n_image += 1
            elif token == start_id and ids[i + 1 : i + 3] == [video_id, end_id]:
                for seconds, pads in video_frames[n_video]:
                    out.extend(self.encode(f"<{seconds:.1f} seconds>"))
                    out.append(start_id)
                    out.extend([video_id] * pads)
                    out.append(end_id)
                n_video += 1
                i += 3
                continue
            else:
                out.append(token)
            i += 1
        return out


_VIDEO_PLACEHOLDER = VISION_START + VIDEO_TOKEN + VISION_END
_PLACEHOLDER_RE = re.compile("|".join(map(re.escape, (_VIDEO_PLACEHOLDER, IMAGE_TOKEN))))


def _grid_rows(grid: Any, what: str) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    array = np.asarray(grid)
    if array.ndim == 1 and array.size == 3:
        array = array[None]
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] != 3 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be integer rows (t, h, w), got shape {array.shape} and dtype {array.dtype}")
    return [tuple(int(v) for v in row) for row in array]


def _tokens_per_grid(grid: tuple[int, int, int], merge: int, what: str) -> int:
    t, h, w = grid
    if t <= 0 or h <= 0 or w <= 0 or h % merge or w % merge:
        raise ValueError(f"{what} = {grid} is not a valid grid for merge size {merge}")
    return t * h * w // merge**2


def _check_placeholder_counts(images: int, videos: int, video_pads: int, n_images: int, n_videos: int) -> None:
    if video_pads != videos:
        raise ValueError(
            f"the prompt has {video_pads - videos} {VIDEO_TOKEN} outside a {_VIDEO_PLACEHOLDER} placeholder; "
            "each video must appear as that three-token sequence, as the chat template writes it"
        )
    if images != n_images:
        raise ValueError(
            f"the prompt has {images} {IMAGE_TOKEN} placeholders but {n_images} images were given "
            "(one placeholder per image; expand a rendered prompt once)"
        )
    if videos != n_videos:
        raise ValueError(
            f"the prompt has {videos} {_VIDEO_PLACEHOLDER} placeholders but {n_videos} videos were given "
            "(one placeholder per video; expand a rendered prompt once)"
        )


def _expand_text(text: str, image_counts: list[int], video_frames: list[list[tuple[float, int]]]) -> str:
    n_images = text.count(IMAGE_TOKEN)
    n_videos = text.count(_VIDEO_PLACEHOLDER)
    _check_placeholder_counts(n_images, n_videos, text.count(VIDEO_TOKEN), len(image_counts), len(video_frames))
    pieces: list[str] = []
    position = n_image = n_video = 0
    for match in _PLACEHOLDER_RE.finditer(text):
        pieces.append(text[position : match.start()])
        if match.group() == IMAGE_TOKEN:
            pieces.append(IMAGE_TOKEN * image_counts[n_image])
            n_image += 1
        else:
            for seconds, pads in video_frames[n_video]:
                pieces.append(f"<{seconds:.1f} seconds>{VISION_START}{VIDEO_TOKEN * pads}{VISION_END}")
            n_video += 1
        position = match.end()
    pieces.append(text[position:])
    return "".join(pieces)


# --------------------------------------------------------------------------------------------------------
# Loading from a checkpoint folder
# --------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special-token entry from tokenizer_config: a string, or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_named_template(templates: Any, source: Path) -> str:
    """A `chat_template` value: a string, or a list of `{name, template}` of which we use "default"."""
    if isinstance(templates, str):
        return templates
    if isinstance(templates, list):
        named = {item.get("name"): item.get("template") for item in templates if isinstance(item, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{source}: chat_template lists {sorted(map(str, named))} but no 'default' template")
    raise ValueError(f"{source}: chat_template should be a string or a list of {{name, template}}")


def _load_chat_template(folder: Path, tokenizer_config: dict) -> str:
    """`chat_template.jinja` first (transformers 5 layout), then tokenizer_config, then `chat_template.json`."""
    jinja_file = folder / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    if tokenizer_config.get("chat_template") is not None:
        return _pick_named_template(tokenizer_config["chat_template"], folder / TOKENIZER_CONFIG_FILE)
    json_file = folder / CHAT_TEMPLATE_JSON_FILE
    if json_file.is_file():
        data = _read_json(json_file)
        if data.get("chat_template") is not None:
            return _pick_named_template(data["chat_template"], json_file)
    raise FileNotFoundError(
        f"no chat template in {folder}: expected {CHAT_TEMPLATE_FILE}, a 'chat_template' entry in "
        f"{TOKENIZER_CONFIG_FILE}, or {CHAT_TEMPLATE_JSON_FILE}"
    )


def _register_added_tokens(tokenizer: Tokenizer, tokenizer_config: dict, folder: Path) -> None:
    """Add tokens that tokenizer_config's `added_tokens_decoder` declares but tokenizer.json lacks.

    transformers does the same on load. A declared id that the tokenizer cannot honour means the two files
    disagree, which would silently shift every special id, so it is an error.
    """
    declared = tokenizer_config.get("added_tokens_decoder") or {}
    for raw_id, entry in sorted(declared.items(), key=lambda item: int(item[0])):
        content = _token_content(entry)
        if content is None:
            continue
        existing = tokenizer.token_to_id(content)
        if existing is not None:
            if existing != int(raw_id):
                raise ValueError(
                    f"{folder / TOKENIZER_CONFIG_FILE} declares {content!r} as id {raw_id}, but "
                    f"{TOKENIZER_FILE} has it as id {existing}"
                )
            continue
        special = bool(entry.get("special", True))
        added = AddedToken(
            content,
            special=special,
            normalized=bool(entry.get("normalized", not special)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            single_word=bool(entry.get("single_word", False)),
        )
        tokenizer.add_tokens([added])
        if tokenizer.token_to_id(content) != int(raw_id):
            raise ValueError(
                f"{folder / TOKENIZER_CONFIG_FILE} declares {content!r} as id {raw_id}, but {TOKENIZER_FILE} "
                f"would give it id {tokenizer.token_to_id(content)}"
            )


def _special_tokens(tokenizer_config: dict) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        content = _token_content(tokenizer_config.get(name))
        if content is not None:
            tokens[name] = content
    return tokens


def _eos_token_ids(folder: Path, tokenizer: Tokenizer, special_tokens: Mapping[str, str]) -> list[int]:
    """Stop ids: generation_config's `eos_token_id` (int or list), then tokenizer_config's eos if not listed.

    Qwen3.6 stops on both `<|im_end|>` and `<|endoftext|>`; some conversions name only one of them as the
    tokenizer's eos, so the union is what generation must stop on.
    """
    ids: list[int] = []
    generation_config = folder / GENERATION_CONFIG_FILE
    if generation_config.is_file():
        value = _read_json(generation_config).get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and not isinstance(item, bool) and item not in ids:
                ids.append(item)
    eos = special_tokens.get("eos_token")
    eos_id = None if eos is None else tokenizer.token_to_id(eos)
    if eos_id is not None and eos_id not in ids:
        ids.append(eos_id)
    if not ids:
        raise ValueError(
            f"no end-of-sequence token in {folder}: {GENERATION_CONFIG_FILE} has no eos_token_id and "
            f"{TOKENIZER_CONFIG_FILE} has no eos_token in the vocabulary"
        )
    return ids


def load_processor(path: str | Path) -> Processor:
    """Build the Processor from a checkpoint folder (tokenizer.json, tokenizer_config.json, chat template,
    generation_config.json, and preprocessor_config.json / video_preprocessor_config.json for the image and
    video processors, which fall back to the released values when absent), without transformers.

    Raises FileNotFoundError naming the folder and file when the folder, tokenizer.json or any chat template is
    missing.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"processor folder {folder} does not exist")
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}; a Qwen3.6 checkpoint folder must contain it")
    config_file = folder / TOKENIZER_CONFIG_FILE
    tokenizer_config = _read_json(config_file) if config_file.is_file() else {}
    chat_template = _load_chat_template(folder, tokenizer_config)  # before the slow tokenizer load: fail fast
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    _register_added_tokens(tokenizer, tokenizer_config, folder)
    special_tokens = _special_tokens(tokenizer_config)
    return Processor(
        tokenizer=tokenizer,
        chat_template=chat_template,
        eos_token_ids=_eos_token_ids(folder, tokenizer, special_tokens),
        special_tokens=special_tokens,
        generation_config=_read_json(folder / GENERATION_CONFIG_FILE)
        if (folder / GENERATION_CONFIG_FILE).is_file() else {},
        image_processor=ImageProcessor.from_pretrained(folder),
        video_processor=VideoProcessor.from_pretrained(folder),
    )
