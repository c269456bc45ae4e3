"""OpenAI Chat Completions and Completions on top of `stream_generate`: requests in, responses and stream chunks
out (CHAT_FORMAT.md §5). Nothing here knows of HTTP; `server` carries these over the wire."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .generator import GenerationChunk
from .tool_parser import CONTENT, REASONING, ToolCall


class RequestError(ValueError):
    """A request the server refuses (400), naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "seed")


def _number(body: dict, name: str, kind: type | tuple = (int, float)) -> Any:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise RequestError(f"'{name}' must be a number, got {value!r}", name)
    return value


def max_tokens(body: dict, *names: str, default: int | None = None) -> int:
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"'{name}' must be an integer >= 1, got {value!r}", name)
            return value
    if default is None:
        raise RequestError(f"'{names[0]}' is required", names[0])
    return default


def stops(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise RequestError(f"'{name}' must be a string or a list of strings", name)


def sampling(body: dict) -> dict[str, Any]:
    out = {name: _number(body, name) for name in SAMPLING}
    if out["top_k"] is not None and out["top_k"] == -1:  # vLLM's spelling of "no top-k"
        out["top_k"] = 0
    return out


def check_messages(messages: Any, media: Any) -> list[dict]:
    """OpenAI-style messages, each media URL passed through `media` (which refuses what may not be read)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}] needs a role of system, user, assistant or tool", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image_url", "video_url"):
                    url = part.get(kind)
                    url = url.get("url") if isinstance(url, dict) else url
                    media(url, f"messages[{i}].content[{j}]")
                elif kind != "text":
                    raise RequestError(f"messages[{i}].content[{j}]: unsupported part type {kind!r}",
                                       f"messages[{i}].content")
        if m["role"] == "developer":
            messages[i] = dict(m, role="system")
    return messages


def chat_request(body: dict, media: Any) -> tuple[list[dict], dict[str, Any]]:
    """(messages, stream_generate keyword arguments) of a Chat Completions request."""
    messages = check_messages(body.get("messages"), media)
    if body.get("n") not in (None, 1):
        raise RequestError("only n = 1 is served (one choice per request)", "n")
    template = body.get("chat_template_kwargs") or {}
    if not isinstance(template, dict):
        raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    if body.get("tool_choice") == "none":
        tools = None  # the model is not offered them
    kwargs = dict(sampling(body), max_tokens=max_tokens(body, "max_completion_tokens", "max_tokens", default=4096),
                  stop=stops(body.get("stop"), "stop"), tools=tools or None,
                  enable_thinking=bool(template.get("enable_thinking", True)),
                  preserve_thinking=bool(template.get("preserve_thinking", False)))
    return messages, kwargs


@dataclass
class Usage:
    prompt: int = 0
    cached: int = 0
    completion: int = 0

    def openai(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}

    def update(self, chunk: GenerationChunk) -> None:
        self.prompt, self.cached, self.completion = chunk.prompt_tokens, chunk.cached_tokens, chunk.generation_tokens


@dataclass
class Reply:
    """A whole reply, gathered from the chunks."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish: str = "stop"
    stop_string: str | None = None
    usage: Usage = field(default_factory=Usage)

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.phase == REASONING:
            self.reasoning.append(chunk.text)
        elif chunk.phase == CONTENT:
            self.content.append(chunk.text)
        self.tool_calls += chunk.tool_calls
        self.usage.update(chunk)
        if chunk.finish_reason:
            self.finish, self.stop_string = chunk.finish_reason, chunk.stop_string


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.content) or None}
    reasoning = "".join(reply.reasoning)
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if reply.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in reply.tool_calls]
    return {"id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}],
            "usage": reply.usage.openai()}


class ChatStream:
    """The chunks of a streamed Chat Completion, one `chunk(...)` per GenerationChunk."""

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created, self.model, self.include_usage = completion_id(), int(time.time()), model, include_usage
        self.calls = 0
        self.usage = Usage()

    def _chunk(self, delta: dict, finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def start(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def chunks(self, chunk: GenerationChunk) -> Iterator[dict[str, Any]]:
        self.usage.update(chunk)
        if chunk.text and chunk.phase == REASONING:
            yield self._chunk({"reasoning_content": chunk.text, "reasoning": chunk.text})
        elif chunk.text and chunk.phase == CONTENT:
            yield self._chunk({"content": chunk.text})
        for call in chunk.tool_calls:
            yield self._chunk({"tool_calls": [dict(call.to_openai(), index=self.calls)]})
            self.calls += 1
        if chunk.finish_reason:
            yield self._chunk({}, chunk.finish_reason)
            if self.include_usage:
                yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [], "usage": self.usage.openai()}


def completion_request(body: dict, processor: Any) -> tuple[list[int], dict[str, Any]]:
    """(prompt token ids, stream_generate keyword arguments) of a legacy Completions request: the prompt as it is,
    no chat template."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        ids = processor.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
    else:
        raise RequestError("'prompt' must be a non-empty string or a list of token ids", "prompt")
    kwargs = dict(sampling(body), max_tokens=max_tokens(body, "max_tokens", default=16),
                  stop=stops(body.get("stop"), "stop"), enable_thinking=False)
    return ids, kwargs


def completion_chunk(cid: str, created: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
