"""Streaming generation: prompt -> (cached) prefill -> sampling loop -> text, reasoning and tool calls.

The prompt is rendered with the chat template, the longest cached prefix is reused (see `prompt_cache`), the rest
is prefilled in chunks that end on message boundaries (where snapshots are taken), and each sampled token goes
through the streaming detokenizer, the stop-string filter and the reasoning/tool-call parser. Every model step is
atomic for the prompt cache: if it is interrupted (Ctrl-C, a closed stream), the cache is rolled back to the last
token it fully processed, so the conversation can go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import atomic
from .cache import buffers as cache_buffers
from .cache import restore as restore_cache
from .detokenizer import StreamingDetokenizer
from .fast import decode_step
from .memory import context_of
from .model import DEFAULT_PREFILL_CHUNK, Model
from .multimodal import MediaPrompt, collect_media, embed, media_prompt, with_media
from .positions import text_position_ids
from .prompt_cache import IM_START, PromptCache
from .sampling import Sampler, SamplingParams, from_generation_config, preset
from .speculative import SpeculativeDecoder, parse_draft_tokens
from .tool_parser import CONTENT, REASONING, TOOL_CALL, Event, StreamParser, ToolCall, initial_phase

DEFAULT_MAX_TOKENS = 4096

logger = logging.getLogger(__name__)


@dataclass
class GenerationChunk:
    """One step of the stream. `text` is new visible text of `phase`; `token` is the sampled id (None on the
    extra chunk a token may produce when it releases text of two phases, and on the final summary chunk)."""

    text: str
    token: int | None
    phase: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    draft_acceptance: list[float] | None = None  # speculative decoding: acceptance rate per draft position
    tokens_per_forward: float | None = None  # speculative decoding: tokens per main-model forward
    stop_string: str | None = None  # on the final chunk: the stop string that ended the reply, if one did


@dataclass
class GenerationResult:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    finish_reason: str
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    draft_acceptance: list[float] | None = None
    tokens_per_forward: float | None = None


class StopStrings:
    """Cuts the stream at the first stop string; text that may begin one is held back, so none is ever emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the stream

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.held += text
        hits = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if hits:
            first, self.matched = min(hits)
            out, self.held = self.held[:first], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def sampling_params(processor: Any, preset_name: str | None = None, **overrides: Any) -> SamplingParams:
    """generation_config.json defaults, then a named preset, then every argument that is not None."""
    params = preset(preset_name) if preset_name else from_generation_config(processor.generation_config)
    return replace(params, **{k: v for k, v in overrides.items() if v is not None})


def build_prompt(processor: Any, prompt: str | Sequence[Any], tools: Sequence[dict] | None, enable_thinking: bool,
                 preserve_thinking: bool) -> tuple[list[int], str]:
    """Token ids and text of the prompt. A string is one user message; a list of ints is taken as token ids."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
        return ids, processor.decode(ids)
    text = processor.apply_chat_template(list(prompt), tools=tools, enable_thinking=enable_thinking,
                                         preserve_thinking=preserve_thinking, tokenize=False)
    return processor.encode(text), text


def _atomic_step(model: Model, pc: PromptCache, tokens: list[int], keys: list[int] | None = None,
                 embeddings: mx.array | None = None, position_ids: mx.array | None = None) -> mx.array:
    """Push prompt tokens through the cache and return their final-normed hidden states [1, T, H]; on any
    interruption roll the cache back to before them.

    `keys` are what the prompt cache records (the tokens, with media pads replaced by content keys).
    """
    with atomic(pc.cache):
        hidden = model.model(mx.array([tokens]), pc.cache, position_ids, embeddings)
        mx.eval(hidden, [c.state for c in pc.cache])
    pc.record(keys if keys is not None else tokens)
    return hidden


HiddenHook = Callable[[int, mx.array, list[int], "mx.array | None"], None]


def prefill(model: Model, pc: PromptCache, prompt: list[int], start: int, chunk_size: int,
            media: MediaPrompt | None = None, on_hidden: HiddenHook | None = None) -> mx.array:
    """Prefill prompt[start:] in chunks that end on message boundaries (snapshotted); returns the last logits.

    With media, the chunks take their input embeddings (vision features scattered in) and 3-D positions.
    `on_hidden(a, hidden, next_tokens, position_ids)` sees each chunk's hidden states (speculative decoding's
    MTP head takes them in).
    """
    boundaries = {p for p in range(start + 1, len(prompt)) if prompt[p] == IM_START}
    emb = embed(model, media, start, pc.features) if media is not None else None
    keys = media.keys if media is not None else prompt

    def step(a: int, b: int) -> mx.array:
        extra = {} if media is None else {"embeddings": emb[:, a - start: b - start],
                                          "position_ids": media.position_ids[:, :, a:b]}
        hidden = _atomic_step(model, pc, prompt[a:b], keys[a:b], **extra)
        if on_hidden is not None:
            on_hidden(a, hidden, prompt[a + 1: b + 1], extra.get("position_ids"))
        return hidden

    pos = start
    while pos < len(prompt) - 1:
        end = min(pos + chunk_size, len(prompt) - 1, min((b for b in boundaries if b > pos), default=len(prompt)))
        step(pos, end)
        if end in boundaries:
            pc.mark()
        pos = end
    return model.logits(step(len(prompt) - 1, len(prompt))[:, -1])


def stream_generate(
    model: Model,
    processor: Any,
    prompt_or_messages: str | Sequence[Any],
    *,
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    tools: Sequence[dict] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
    prompt_cache: PromptCache | None = None,
    preset: str | None = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    draft_tokens: int | str | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> Iterator[GenerationChunk]:
    """Generate a reply, streaming a `GenerationChunk` per sampled token and a final chunk with `finish_reason`
    ("stop", "length" or "tool_calls") and the statistics. `temperature=0` is greedy.

    `draft_tokens` (1-4 or "auto"; needs the MTP head, `load(..., mtp=True)`): speculative decoding with the MTP
    head, at most that many drafts per main-model forward ("auto": 3), the depth adapted to what pays; the output
    has the same distribution (greedy: the same tokens) as without it. See `speculative`.

    `kv_bits` (4 or 8; groups of `kv_group_size`): a new prompt cache keeps the attention KV quantized (a
    `prompt_cache` passed in keeps its own setting, which must then agree)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    draft_depth = parse_draft_tokens(draft_tokens)
    if draft_depth and "mtp" not in model:
        raise ValueError("draft_tokens needs the model's MTP head: load it with mtp=True (load(path, mtp=True), "
                         "or --mtp on the command line)")
    params = sampling_params(processor, preset, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             repetition_penalty=repetition_penalty, seed=seed)
    if images or videos:
        if not isinstance(prompt_or_messages, str):
            raise ValueError("images= and videos= go with a string prompt; in messages, use image_url/video_url parts")
        prompt_or_messages = with_media(prompt_or_messages, images, videos)
    ids, text = build_prompt(processor, prompt_or_messages, tools, enable_thinking, preserve_thinking)
    if prompt_cache is None:
        pc = PromptCache(model, kv_bits=kv_bits, kv_group_size=kv_group_size)
    else:
        pc = prompt_cache
        if kv_bits is not None and (pc.kv_bits, pc.kv_group_size) != (kv_bits, kv_group_size):
            raise ValueError(f"kv_bits={kv_bits}, kv_group_size={kv_group_size} differ from the prompt cache's "
                             f"({pc.kv_bits}, {pc.kv_group_size}); make the cache with the same settings")
    media = None
    if not isinstance(prompt_or_messages, str) and not all(isinstance(t, int) for t in prompt_or_messages):
        found_images, found_videos = collect_media(prompt_or_messages)
        if found_images or found_videos:
            media = media_prompt(model, processor, text, found_images, found_videos, pc.media)
            ids = media.ids
    vocab = model.config.text.vocab_size
    if max(ids, default=0) >= vocab or min(ids, default=0) < 0:
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab}")
    context = context_of(model)
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {context} tokens"
                         + ("" if context == model.config.text.max_position_embeddings else
                            " (what fits this machine's memory: see python -m mlx_qwen36.bench --plan)"))
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    yield from _generate(model, processor, pc, ids, text, params, tools, max_tokens, stops, prefill_chunk_size,
                         media, draft_depth)


@contextmanager
def wired_limit(model: Any) -> Iterator[None]:
    """While generating on a Metal GPU, let the model's weights stay wired (resident) up to the GPU's recommended
    working set, as mlx-lm does, so that macOS does not page a 20 GB model out between tokens. Elsewhere a no-op."""
    if not mx.metal.is_available():
        yield
        return
    limit = mx.device_info()["max_recommended_working_set_size"]
    weights = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    if weights > 0.9 * limit:
        logger.warning("the model's weights take %.1f GB of the %.1f GB this GPU can keep resident; generation "
                       "may be slow (close other programs, or use a smaller quantization)", weights / 1e9,
                       limit / 1e9)
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()  # the limit must not change under a running async_eval
        mx.set_wired_limit(old)


@dataclass
class _InFlight:
    """A decode step queued on the device: its logits, and the cache as it was before it (to drop it)."""

    logits: mx.array
    before: list[Any]


def _launch_step(model: Model, pc: PromptCache, token: mx.array, step: Callable | None,
                 rope_delta: int) -> _InFlight:
    """Queue the decode step that feeds `token` (lazy [1]) and return at once; the cache holds its lazy outputs.

    Building the graph can be interrupted (Ctrl-C): the cache is then put back as it was, so every step stays
    atomic for the prompt cache.
    """
    with atomic(pc.cache) as before:
        x = token.reshape(1, 1)
        if step is not None:
            logits = step(x, pc.cache, rope_delta)[:, -1]
        else:
            positions = text_position_ids(len(pc.tokens), 1, rope_delta) if rope_delta else None
            logits = model(x, pc.cache, position_ids=positions)[:, -1]
        mx.async_eval(logits, cache_buffers(pc.cache))
    return _InFlight(logits, before)


class PlainDecoder:
    """The token source of plain decoding. It keeps one step in flight: the step that feeds token t is queued
    before t is read back, so the device computes it while the host detokenizes, parses and yields t (one host
    sync per token, `item()`). `close()` drops the step still in flight: the cache then holds the prompt and every
    token returned but the last, as if each step had run only once its token was known to be needed."""

    def __init__(self, model: Model, pc: PromptCache, sampler: Sampler, rope_delta: int | mx.array):
        self.model, self.pc, self.sampler, self.rope_delta = model, pc, sampler, rope_delta
        self.step = decode_step(model) if isinstance(model, Model) else None
        self.inflight: _InFlight | None = None
        self.last: int | None = None

    def start(self, logits: mx.array, generated: list[int]) -> int:
        return self._sample(logits, generated)

    def next(self, generated: list[int]) -> int:
        self.pc.record([self.last])  # its step, in flight, is now part of the conversation
        logits, self.inflight = self.inflight.logits, None
        return self._sample(logits, generated)

    def _sample(self, logits: mx.array, generated: list[int]) -> int:
        y = self.sampler.sample(logits, generated)
        self.inflight = _launch_step(self.model, self.pc, y, self.step, self.rope_delta)
        self.last = int(y.item())
        return self.last

    def close(self) -> None:
        if self.inflight is not None:
            restore_cache(self.pc.cache, self.inflight.before)
            self.inflight = None


def _generate(model: Model, processor: Any, pc: PromptCache, ids: list[int], text: str, params: SamplingParams,
              tools: Sequence[dict] | None, max_tokens: int, stops: list[str], chunk_size: int,
              media: MediaPrompt | None, draft_depth: int | None) -> Iterator[GenerationChunk]:
    mx.reset_peak_memory()
    start = time.perf_counter()
    rope_delta = media.rope_delta if media is not None else 0
    sampler = Sampler(params)
    if draft_depth:
        source: Any = SpeculativeDecoder(model, pc, sampler, draft_depth, rope_delta)
    else:
        source = PlainDecoder(model, pc, sampler, rope_delta)
    cached = pc.reuse(model, media.keys if media is not None else ids)
    logits = prefill(model, pc, ids, cached, chunk_size, media,
                     on_hidden=source.prompt_chunk if draft_depth else None)
    pc.mark()
    prompt_time = time.perf_counter() - start
    stats = {"prompt_tokens": len(ids), "cached_tokens": cached,
             "prompt_tps": (len(ids) - cached) / max(prompt_time, 1e-9)}

    detok = StreamingDetokenizer(processor)
    parser = StreamParser(initial_phase(text), list(tools) if tools else None)
    stopper = StopStrings(stops)
    eos = set(processor.eos_token_ids)
    limit = min(max_tokens, context_of(model) - len(ids))
    generated: list[int] = []
    finish = "length"
    stopped_by_string = saw_tool_call = False
    gen_start = time.perf_counter()

    def live(**extra) -> dict:
        n = len(generated)
        spec = {}
        if draft_depth:
            spec = {"draft_acceptance": source.stats.acceptance, "tokens_per_forward": source.stats.tokens_per_forward}
        return dict(stats, generation_tokens=n, generation_tps=n / max(time.perf_counter() - gen_start, 1e-9),
                    peak_memory_gb=mx.get_peak_memory() / 1e9, **spec, **extra)

    def chunks(events: list[Event], token: int | None) -> Iterator[GenerationChunk]:
        nonlocal saw_tool_call
        if not events:
            yield GenerationChunk("", token, parser.phase, **live())
        for i, ev in enumerate(events):
            calls = [ev.tool_call] if ev.tool_call is not None else []
            saw_tool_call |= bool(calls)
            yield GenerationChunk(ev.text, token if i == len(events) - 1 else None, ev.phase, calls, **live())

    with wired_limit(model):
        try:
            token = source.start(logits, generated)
            while True:
                generated.append(token)
                if token in eos:
                    finish = "stop"
                    yield from chunks([], token)
                    break
                delta, stopped_by_string = stopper.feed(detok.add_token(token))
                yield from chunks(parser.feed(delta), token)
                if stopped_by_string:
                    finish = "stop"
                    break
                if len(generated) == limit:
                    break
                token = source.next(generated)
            events = []
            if not stopped_by_string:
                tail, stopped_by_string = stopper.feed(detok.finalize())
                events = parser.feed(tail if stopped_by_string else tail + stopper.flush())
            events += parser.finish()
            if events:
                yield from chunks(events, None)
            if saw_tool_call and finish == "stop":
                finish = "tool_calls"
            yield GenerationChunk("", None, parser.phase, finish_reason=finish, stop_string=stopper.matched, **live())
        finally:
            source.close()
            pc.mark()


def generate(model: Model, processor: Any, prompt_or_messages: str | Sequence[Any], **kwargs: Any
             ) -> GenerationResult:
    """The whole reply at once: reasoning, content, tool calls, finish reason and statistics."""
    parts: dict[str, list[str]] = {REASONING: [], CONTENT: []}
    calls: list[ToolCall] = []
    tokens: list[int] = []
    last: GenerationChunk | None = None
    for chunk in stream_generate(model, processor, prompt_or_messages, **kwargs):
        if chunk.token is not None:
            tokens.append(chunk.token)
        if chunk.phase in parts:
            parts[chunk.phase].append(chunk.text)
        if chunk.phase == TOOL_CALL:
            calls.extend(chunk.tool_calls)
        last = chunk
    assert last is not None and last.finish_reason is not None
    return GenerationResult(
        reasoning="".join(parts[REASONING]), content="".join(parts[CONTENT]), tool_calls=calls,
        finish_reason=last.finish_reason, tokens=tokens, prompt_tokens=last.prompt_tokens,
        cached_tokens=last.cached_tokens, prompt_tps=last.prompt_tps, generation_tps=last.generation_tps,
        peak_memory_gb=last.peak_memory_gb, draft_acceptance=last.draft_acceptance,
        tokens_per_forward=last.tokens_per_forward,
    )
