"""Anthropic Messages on top of `stream_generate`: a request becomes OpenAI-style messages for the chat template
(system, text, image, tool_use, tool_result and thinking blocks), the reply becomes content blocks, and a stream
becomes Anthropic's SSE events. Nothing here knows of HTTP."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from .api_openai import Reply, RequestError, Usage, max_tokens, stops
from .generator import GenerationChunk
from .tool_parser import CONTENT, REASONING

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise RequestError(f"{where}[{i}]: only text blocks are accepted here", where)
            out.append(block.get("text", ""))
        return "".join(out)
    raise RequestError(f"{where} must be a string or a list of text blocks", where)


def _image(block: dict, where: str, media: Any) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url")
    else:
        raise RequestError(f"{where}: an image source is base64 or url", where)
    media(url, where)
    return {"type": "image_url", "image_url": {"url": url}}


def _messages(body: dict, media: Any) -> list[dict]:
    out: list[dict] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"{where} needs a role of user or assistant", where)
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of blocks", where)
        parts: list[dict] = []
        reply: dict[str, Any] = {"role": "assistant", "content": ""}
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            at = f"{where}.content[{j}]"
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image" and m["role"] == "user":
                parts.append(_image(block, at, media))
            elif kind == "tool_result" and m["role"] == "user":
                if parts:
                    out.append({"role": "user", "content": parts})
                    parts = []
                result = block.get("content", "")
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _text(result, f"{at}.content") if result else ""})
            elif kind == "tool_use" and m["role"] == "assistant":
                reply.setdefault("tool_calls", []).append(
                    {"id": block.get("id"), "type": "function",
                     "function": {"name": block.get("name"), "arguments": block.get("input") or {}}})
            elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
                reply["reasoning_content"] = reply.get("reasoning_content", "") + block.get("thinking", "")
            else:
                raise RequestError(f"{at}: unsupported block {kind!r} in a {m['role']} message", at)
        if m["role"] == "assistant":
            reply["content"] = "".join(p["text"] for p in parts)
            out.append(reply)
        elif parts:
            out.append({"role": "user", "content": parts})
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    choice = body.get("tool_choice") or {}
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not t.get("name"):
            raise RequestError(f"tools[{i}] needs a name", f"tools[{i}]")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                     "parameters": t.get("input_schema") or {"type": "object"}}})
    return out


def messages_request(body: dict, media: Any) -> tuple[list[dict], dict[str, Any]]:
    """(messages, stream_generate keyword arguments) of a Messages request."""
    thinking = body.get("thinking")
    enabled = not (isinstance(thinking, dict) and thinking.get("type") == "disabled")
    kwargs: dict[str, Any] = {name: body.get(name) for name in ("temperature", "top_p", "top_k")}
    kwargs.update(max_tokens=max_tokens(body, "max_tokens"), stop=stops(body.get("stop_sequences"), "stop_sequences"),
                  tools=_tools(body), enable_thinking=enabled, preserve_thinking=True)
    return _messages(body, media), kwargs


def count_request(body: dict, media: Any) -> tuple[list[dict], list[dict] | None, bool]:
    messages, kwargs = messages_request(dict(body, max_tokens=1), media)
    return messages, kwargs["tools"], kwargs["enable_thinking"]


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def _stop(reply_finish: str, stop_string: str | None) -> tuple[str, str | None]:
    if reply_finish == "stop" and stop_string is not None:
        return "stop_sequence", stop_string
    return STOP_REASONS.get(reply_finish, "end_turn"), None


def _usage(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt - usage.cached, "output_tokens": usage.completion,
            "cache_read_input_tokens": usage.cached, "cache_creation_input_tokens": 0}


def message_response(reply: Reply, model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    reasoning = "".join(reply.reasoning)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = "".join(reply.content)
    if text:
        content.append({"type": "text", "text": text})
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in reply.tool_calls]
    reason, sequence = _stop(reply.finish, reply.stop_string)
    return {"id": message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(reply.usage)}


class MessageStream:
    """Anthropic's stream events, as (event name, data) pairs, one `events(...)` call per GenerationChunk."""

    def __init__(self, model: str):
        self.model, self.id = model, message_id()
        self.index = -1
        self.open: str | None = None  # the kind of the content block open now
        self.usage = Usage()

    def start(self, first: GenerationChunk) -> tuple[str, dict]:
        """The opening event, sent with the first chunk (after the prefill: its usage counts the prompt)."""
        self.usage.update(first)
        return "message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(_usage(self.usage), output_tokens=0)}}

    def _close(self) -> Iterator[tuple[str, dict]]:
        if self.open is not None:
            if self.open == "thinking":
                yield "content_block_delta", {"type": "content_block_delta", "index": self.index,
                                              "delta": {"type": "signature_delta", "signature": ""}}
            yield "content_block_stop", {"type": "content_block_stop", "index": self.index}
            self.open = None

    def _open(self, kind: str, block: dict) -> Iterator[tuple[str, dict]]:
        yield from self._close()
        self.index += 1
        self.open = kind
        yield "content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def events(self, chunk: GenerationChunk) -> Iterator[tuple[str, dict]]:
        self.usage.update(chunk)
        if chunk.text and chunk.phase == REASONING:
            if self.open != "thinking":
                yield from self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            yield self._delta({"type": "thinking_delta", "thinking": chunk.text})
        elif chunk.text and chunk.phase == CONTENT:
            if self.open != "text":
                yield from self._open("text", {"type": "text", "text": ""})
            yield self._delta({"type": "text_delta", "text": chunk.text})
        for call in chunk.tool_calls:
            yield from self._open("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            yield self._delta({"type": "input_json_delta", "partial_json": json.dumps(call.arguments,
                                                                                      ensure_ascii=False)})
        if chunk.finish_reason:
            yield from self._close()
            reason, sequence = _stop(chunk.finish_reason, chunk.stop_string)
            yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": reason,
                                                                       "stop_sequence": sequence},
                                    "usage": _usage(self.usage)}
            yield "message_stop", {"type": "message_stop"}
