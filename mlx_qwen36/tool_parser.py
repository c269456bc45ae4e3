"""Reasoning and tool-call parsing for Qwen3.6 output, streamed or whole.

One parser serves the generator and the OpenAI server, so that streamed and non-streamed answers agree.

Tool calls use the Qwen3-Coder XML form (CHAT_FORMAT.md §4.2):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

`parse_tool_call` turns one such block into a `ToolCall`, converting each value with the JSON-schema type the
request's `tools` give it, as vLLM's and mlx-lm's `qwen3_coder` parsers do.

`StreamParser` splits a streamed assistant turn into reasoning, content and tool calls. Its choices:

- The start phase comes from the prompt (`initial_phase`): Qwen3.6's template ends the prompt with `<think>\\n`,
  so generated text usually starts inside reasoning and holds only `</think>` (mlx-lm does the same).
- `</think>` ends reasoning; `<think>` starts it (the model may open its own block). A `<think>` inside
  reasoning or a `</think>` inside content is dropped. No marker is ever emitted as text, except inside the
  raw text of a malformed tool call, which is passed through as content.
- A `<tool_call>` inside reasoning that is followed (after whitespace) by `<function=` ends the reasoning and
  starts a real call. This is what current vLLM does (its Qwen3 reasoning parser treats it as an implicit end
  of reasoning, because Qwen3.5/3.6 sometimes call tools without closing `</think>`), and mlx-lm's state machine
  also leaves reasoning on `<tool_call>`. A bare `<tool_call>` mention in reasoning stays reasoning text. Pass
  `tool_calls_in_reasoning=False` for the older vLLM behaviour, where any tool call inside reasoning is
  reasoning text.
- Leading newlines of each text segment are dropped: at the start of the turn and after every marker. The model
  writes `</think>\\n\\n` before its answer and `\\n` between calls. vLLM and mlx-lm pass those newlines through
  as content; we drop them so that the answer does not start with blank lines and a turn made only of tool
  calls has empty content. The template trims content when it re-renders history, so nothing is lost.
  Trailing newlines are kept, because they could only be removed by holding text back.
- A malformed tool call degrades to content holding its raw text, with a logged warning, never an exception.
  A `<tool_call>` still open at `finish()` is parsed when its `</function>` is complete (vLLM's and mlx-lm's
  parsers accept an unclosed final call too); otherwise it degrades the same way.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTENT",
    "REASONING",
    "TOOL_CALL",
    "Event",
    "ParsedOutput",
    "StreamParser",
    "ToolCall",
    "ToolCallParseError",
    "convert_param_value",
    "initial_phase",
    "parse_full",
    "parse_tool_call",
    "tool_call_deltas",
]

logger = logging.getLogger(__name__)

REASONING = "reasoning"
CONTENT = "content"
TOOL_CALL = "tool_call"

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION_PREFIX = "<function="
FUNCTION_END = "</function>"
PARAMETER_PREFIX = "<parameter="
PARAMETER_END = "</parameter>"

_FUNCTION_OPEN = re.compile(r"<function=([^>]*)>")
_PARAMETER_OPEN = re.compile(r"<parameter=([^>]*)>")
# A `</parameter>` is structural when only whitespace separates it from the next parameter or the body's end;
# an earlier one is literal text inside the value (e.g. a file the model is writing).
_AFTER_PARAMETER = re.compile(r"\s*(?:<parameter=|\Z)")

_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
_BOOL_TYPES = frozenset({"boolean", "bool", "binary"})
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_FLOAT_PREFIXES = ("num", "float")
_CONTAINER_TYPES = frozenset({"object", "array", "arr"})
_CONTAINER_PREFIXES = ("dict", "list")
_NOT_PARSED = object()


class ToolCallParseError(ValueError):
    """A `<tool_call>` body is not a well-formed Qwen3-Coder XML function call."""


# --------------------------------------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------------------------------------


def _new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One parsed call: the function name and its decoded arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=_new_call_id)

    def arguments_json(self) -> str:
        """The arguments as the JSON string OpenAI clients expect (non-ASCII kept)."""
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self) -> dict[str, Any]:
        """`{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}`."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json()},
        }


def tool_call_deltas(call: ToolCall, index: int) -> list[dict[str, Any]]:
    """The OpenAI streaming `delta.tool_calls` entries for one call, in order.

    The first opens call `index` with its id, type and name and empty arguments; the second carries the whole
    arguments JSON. Clients join `arguments` per index, so the joined string is exactly `arguments_json()`.
    """
    return [
        {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
        {"index": index, "function": {"arguments": call.arguments_json()}},
    ]


def _tool_properties(name: str, tools: list[dict] | None) -> dict[str, Any]:
    """The `parameters.properties` schema of tool `name` (OpenAI `{"type": "function", "function": …}` or bare)."""
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        function = tool.get("function", tool)
        if isinstance(function, dict) and function.get("name") == name:
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            return properties if isinstance(properties, dict) else {}
    return {}


def _schema_type(schema: Any) -> str | None:
    """The lower-cased declared type; for a union (`["string", "null"]`, `anyOf`), its first non-null member."""
    if not isinstance(schema, dict):
        return None
    declared = schema.get("type")
    if declared is None:
        options = schema.get("anyOf") or schema.get("oneOf") or []
        declared = [option.get("type") for option in options if isinstance(option, dict) and "type" in option]
        if not declared:
            return None
    if isinstance(declared, list):
        names = [str(item).strip().lower() for item in declared]
        return next((item for item in names if item != "null"), "null")
    return str(declared).strip().lower()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # NaN/Infinity would make the arguments string invalid JSON


def _json_value(value: str) -> Any:
    try:
        return json.loads(value, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError is a ValueError
        return _NOT_PARSED


def _is_json_safe(value: Any) -> bool:
    """Whether `json.dumps` writes `value` as strict JSON (a literal_eval result may be a set, bytes, nan…)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _literal_value(value: str) -> Any:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_PARSED
    return parsed if _is_json_safe(parsed) else _NOT_PARSED


def _number_value(value: str) -> Any:
    """num*/float*: a float, or an int when integral; the raw string when not a finite number."""
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        return value
    return int(number) if number.is_integer() else number


def convert_param_value(value: str, schema: Any) -> Any:
    """Convert one raw parameter value by its JSON-schema entry (`schema` is None when the key is undeclared).

    The table of CHAT_FORMAT.md §4.2 (vLLM/mlx-lm `qwen3_coder`): "null" → None; undeclared key → raw string;
    string types → raw; int types → int (raw string if not an integer literal); number types → float, int if
    integral; bool types → `lower() == "true"`; object/array → json.loads, then ast.literal_eval, then raw; a
    declared key without a type → its JSON value if that is an object or array, else the raw string; any other
    type → ast.literal_eval, then raw.
    """
    if value.lower() == "null":
        return None
    if schema is None:
        return value
    kind = _schema_type(schema)
    if kind is None:
        parsed = _json_value(value)
        return parsed if isinstance(parsed, (dict, list)) else value
    if kind in _STRING_TYPES:
        return value
    if kind.startswith(_INT_PREFIXES):
        try:
            return int(value)
        except ValueError:
            return value
    if kind.startswith(_FLOAT_PREFIXES):
        return _number_value(value)
    if kind in _BOOL_TYPES:
        return value.lower() == "true"
    if kind in _CONTAINER_TYPES or kind.startswith(_CONTAINER_PREFIXES):
        parsed = _json_value(value)
        if parsed is not _NOT_PARSED:
            return parsed
    parsed = _literal_value(value)
    return value if parsed is _NOT_PARSED else parsed


def _strip_one_newline(value: str) -> str:
    """The template writes `<parameter=K>\\nV\\n</parameter>`: remove exactly that one newline on each side."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _parameter_end(body: str, start: int) -> tuple[int, int]:
    """(end of the value, where scanning resumes) for a value starting at `start`."""
    first = body.find(PARAMETER_END, start)
    close = first
    while close != -1:
        after = close + len(PARAMETER_END)
        if _AFTER_PARAMETER.match(body, after):
            return close, after
        close = body.find(PARAMETER_END, after)
    if first != -1:
        return first, first + len(PARAMETER_END)  # not followed by a parameter: the caller reports the stray text
    # No `</parameter>`: like vLLM, the value runs to the next parameter or the end of the function.
    following = body.find("\n" + PARAMETER_PREFIX, start)
    if following != -1:
        return following + 1, following + 1
    return len(body), len(body)


def _raw_parameters(body: str) -> list[tuple[str, str]]:
    """The (name, raw value) pairs of a function body; anything but whitespace between them is an error."""
    pairs = []
    position = 0
    while True:
        opening = _PARAMETER_OPEN.search(body, position)
        stray = body[position : opening.start() if opening else len(body)].strip()
        if stray:
            raise ToolCallParseError(f"unexpected text {stray[:80]!r} in the function body")
        if opening is None:
            return pairs
        name = opening.group(1).strip()
        if not name:
            raise ToolCallParseError("a <parameter=> tag has no name")
        value_end, position = _parameter_end(body, opening.end())
        pairs.append((name, _strip_one_newline(body[opening.end() : value_end])))


def _call_body(text: str) -> str:
    """The text between `<tool_call>` and `</tool_call>`; either marker may be absent."""
    body = text.strip()
    if body.startswith(TOOL_CALL_START):
        body = body[len(TOOL_CALL_START) :]
    if body.endswith(TOOL_CALL_END):
        body = body[: -len(TOOL_CALL_END)]
    return body


def parse_tool_call(text: str, tools: list[dict] | None = None) -> ToolCall:
    """Parse one `<tool_call>` block (with or without its markers) into a ToolCall.

    `tools` is the request's tool list; its parameter schemas decide how values convert. A function not in
    `tools` still parses, with string values; the server decides whether to accept it. A missing
    `</function>` or `</parameter>` is tolerated as in vLLM. Raises ToolCallParseError when there is no
    `<function=NAME>`, the name is empty or contains whitespace, or text other than whitespace surrounds the
    function or its parameters.
    """
    body = _call_body(text)
    opening = _FUNCTION_OPEN.search(body)
    if opening is None:
        raise ToolCallParseError(f"no <function=NAME> in the tool call {body.strip()[:80]!r}")
    if body[: opening.start()].strip():
        raise ToolCallParseError(f"unexpected text {body[: opening.start()].strip()[:80]!r} before <function=>")
    name = opening.group(1).strip()
    if not name or any(char.isspace() or char == "<" for char in name):
        raise ToolCallParseError(f"invalid function name {name!r}")
    end = body.rfind(FUNCTION_END)
    if end < opening.end():
        function_body = body[opening.end() :]
    else:
        trailing = body[end + len(FUNCTION_END) :].strip()
        if trailing:
            raise ToolCallParseError(f"unexpected text {trailing[:80]!r} after </function>")
        function_body = body[opening.end() : end]
    properties = _tool_properties(name, tools)
    arguments = {key: convert_param_value(value, properties.get(key)) for key, value in _raw_parameters(function_body)}
    return ToolCall(name=name, arguments=arguments)


# --------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """A piece of the parsed turn: text of phase "reasoning" or "content", or a finished "tool_call"."""

    phase: str
    text: str = ""
    tool_call: ToolCall | None = None


@dataclass
class ParsedOutput:
    """A whole turn, parsed: reasoning text, answer text, and tool calls in order."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def initial_phase(prompt_text: str) -> str:
    """ "reasoning" when the prompt ends inside an open `<think>` (mlx-lm's rfind test), else "content"."""
    return REASONING if prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END) else CONTENT


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """The earliest marker in `text` and its index, or (-1, None)."""
    best, found = -1, None
    for marker in markers:
        index = text.find(marker)
        if index != -1 and (best == -1 or index < best):
            best, found = index, marker
    return best, found


def _partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker (it may complete later)."""
    if not markers:
        return 0
    # Every marker starts with "<", so only a "<" within reach of the end can begin one; the earliest is longest.
    position = text.find("<", max(0, len(text) - max(len(marker) for marker in markers) + 1))
    while position != -1:
        suffix = text[position:]
        if any(len(suffix) < len(marker) and marker.startswith(suffix) for marker in markers):
            return len(suffix)
        position = text.find("<", position + 1)
    return 0


def _function_follows(text: str) -> bool | None:
    """After a `<tool_call>` in reasoning: does `<function=` follow? None while the text cannot tell yet."""
    stripped = text.lstrip()
    if stripped.startswith(FUNCTION_PREFIX):
        return True
    if not stripped or FUNCTION_PREFIX.startswith(stripped):
        return None
    return False


class StreamParser:
    """Incremental parser of one assistant turn: feed it text deltas, get Events.

    `initial_phase` is "reasoning" when the prompt ends inside `<think>` (see the module function
    `initial_phase`), else "content". `tools` is the request's tool list, for value types. Text that could be
    the start of a marker (`</th`) is held back until the next delta decides; everything else is emitted at
    once. `parse_tool_calls=False` treats `<tool_call>` as plain text (e.g. for `tool_choice="none"`).
    """

    def __init__(
        self,
        initial_phase: str = CONTENT,
        tools: list[dict] | None = None,
        *,
        tool_calls_in_reasoning: bool = True,
        parse_tool_calls: bool = True,
    ) -> None:
        if initial_phase not in (REASONING, CONTENT):
            raise ValueError(f"initial_phase must be {REASONING!r} or {CONTENT!r}, got {initial_phase!r}")
        self.tools = tools
        self._phase = initial_phase
        self._pending = ""  # unscanned text: at most a possible marker prefix between calls
        self._tool_body: list[str] = []
        self._segment_start = True  # leading newlines of a segment are dropped
        self._events: list[Event] = []
        tool_marker = (TOOL_CALL_START,) if parse_tool_calls else ()
        self._markers = {
            REASONING: (THINK_END, THINK_START) + (tool_marker if tool_calls_in_reasoning else ()),
            CONTENT: (THINK_START, THINK_END) + tool_marker,
            TOOL_CALL: (TOOL_CALL_END,),
        }

    @property
    def phase(self) -> str:
        """The current phase: "reasoning", "content", or "tool_call" while inside a call."""
        return self._phase

    def feed(self, delta: str) -> list[Event]:
        """Consume a text delta; return the events it completes."""
        self._pending += delta
        self._scan(final=False)
        return self._take_events()

    def finish(self) -> list[Event]:
        """End of the turn: flush held-back text and settle an unclosed tool call."""
        self._scan(final=True)
        if self._phase == TOOL_CALL:
            self._close_unterminated_call()
        return self._take_events()

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _scan(self, final: bool) -> None:
        while True:
            markers = self._markers[self._phase]
            index, marker = _first_marker(self._pending, markers)
            if marker is None:
                keep = 0 if final else _partial_marker_length(self._pending, markers)
                self._text(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                return
            self._text(self._pending[:index])
            rest = self._pending[index + len(marker) :]
            if marker == TOOL_CALL_START and self._phase == REASONING:
                verdict = _function_follows(rest)
                if verdict is None and not final:
                    self._pending = self._pending[index:]  # wait: `<function=` may still come
                    return
                if not verdict:  # a mention of the tag in the model's thinking, not a call
                    self._text(marker)
                    self._pending = rest
                    continue
            self._pending = rest
            self._transition(marker)

    def _transition(self, marker: str) -> None:
        if marker == TOOL_CALL_START:
            self._phase = TOOL_CALL
            self._tool_body = []
            return
        if marker == TOOL_CALL_END:
            self._close_call()
            return
        # THINK_END ends reasoning; inside content it is a stray marker and is simply dropped.
        self._phase = REASONING if marker == THINK_START else CONTENT
        self._segment_start = True

    def _text(self, text: str) -> None:
        if self._phase == TOOL_CALL:
            self._tool_body.append(text)
            return
        if self._segment_start:
            text = text.lstrip("\n")
            if not text:
                return
            self._segment_start = False
        self._emit(self._phase, text)

    def _emit(self, phase: str, text: str) -> None:
        if not text:
            return
        last = self._events[-1] if self._events else None
        if last is not None and last.phase == phase and last.tool_call is None:
            self._events[-1] = Event(phase, last.text + text)
        else:
            self._events.append(Event(phase, text))

    def _close_call(self) -> None:
        body = "".join(self._tool_body)
        self._tool_body = []
        self._phase = CONTENT
        try:
            call = parse_tool_call(body, self.tools)
        except ToolCallParseError as exc:
            self._degrade(TOOL_CALL_START + body + TOOL_CALL_END, str(exc))
            return
        self._events.append(Event(TOOL_CALL, tool_call=call))
        self._segment_start = True  # drop the newline the model writes between calls

    def _close_unterminated_call(self) -> None:
        body = "".join(self._tool_body)
        if FUNCTION_END in body:
            self._close_call()
            return
        self._tool_body = []
        self._phase = CONTENT
        self._degrade(TOOL_CALL_START + body, "the turn ended inside an unfinished <tool_call>")

    def _degrade(self, raw: str, reason: str) -> None:
        """Pass a call that cannot be parsed through as content, so the user still sees what the model wrote."""
        logger.warning("malformed tool call (%s); passing it through as content: %r", reason, raw[:200])
        self._emit(CONTENT, raw)
        self._segment_start = False  # the raw text is content; newlines after it belong to it


def parse_full(
    text: str,
    tools: list[dict] | None = None,
    initial_phase: str = CONTENT,
    **options: Any,
) -> ParsedOutput:
    """Parse a whole turn with the same StreamParser the streaming path uses, so both always agree.

    `options` are StreamParser's keyword options (`tool_calls_in_reasoning`, `parse_tool_calls`).
    """
    parser = StreamParser(initial_phase, tools, **options)
    output = ParsedOutput()
    reasoning: list[str] = []
    content: list[str] = []
    for event in parser.feed(text) + parser.finish():
        if event.phase == REASONING:
            reasoning.append(event.text)
        elif event.phase == CONTENT:
            content.append(event.text)
        elif event.tool_call is not None:
            output.tool_calls.append(event.tool_call)
    output.reasoning = "".join(reasoning)
    output.content = "".join(content)
    return output
