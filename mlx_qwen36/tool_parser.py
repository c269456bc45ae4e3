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
request's `tools` give it, as vLLM's, SGLang's and mlx-lm's `qwen3_coder` parsers do.

Where a value ends. The template writes `<parameter=K>\\nV\\n</parameter>` with strings raw, so a value may hold
any text, tool-call syntax included (an agent writing a parser test, a chat template, a file about tool calls).
The same rules serve the streamed and the whole parse (`_CallScanner`):

- A `</parameter>` ends the value when only whitespace separates it from `<parameter=NAME>` of a *next* parameter,
  from `</function>`, from `</tool_call>` or from the end of the text. A next parameter is one the tool declares
  (any name when the tool or its properties are unknown) and that this call has not given yet.
- A `<parameter=…>` inside a value opens a literal block: the `</parameter>` that closes it is text too (vLLM's
  depth rule), so a value may quote a whole call, `<tool_call>…</tool_call>` and all.
- `<tool_call>`, `</tool_call>`, `<function=…>` and `</function>` inside a value are plain text; a `</tool_call>`
  ends the call only after the function's structural end (or directly after a `</parameter>`, when the model
  left out `</function>`).
- A missing `</parameter>` (vLLM and SGLang accept it): in a value that holds no tag of its own, a line-start
  `<parameter=NAME>` of a next parameter starts that parameter, and a line-start `</function>` followed by
  `</tool_call>` or the end ends the function.

Choices that differ from a peer, and why:

- Only a declared name not yet given starts the next parameter (vLLM filters undeclared names the same way; we
  also skip given ones), so a file's content may quote `</parameter>\\n<parameter=path>` without replacing the
  real path. The first parameter may be undeclared: nothing else could stand there.
- A model that repeats or invents a parameter leaves its call open (the quoted-block rule takes the real
  `</parameter>` as quoted), so at the end of the turn an open call is read again with every `<parameter=…>`
  taken as a parameter: an invented name becomes an extra argument, as in vLLM, SGLang and mlx-lm. A name
  given twice fails the call, which passes through as content. The peers let the last copy overwrite the first;
  we do not guess, because one copy may be quoted text (a path taken from a file's content).
- We do not repair drifted markers (`</parameter1>`, a bare `</parameter`) as SGLang does: values stay exactly
  what the model wrote.
- A `<function=…>` without `<tool_call>` is a call for `parse_tool_call` (vLLM's fallback) but text in a stream:
  Qwen3.6 always opens with `<tool_call>`, and prose about the format is common.

Value conversion (`convert_param_value`), the table of CHAT_FORMAT.md §4.2 with these decisions:

- integer types: an integer literal stays an exact int (ids and nanosecond timestamps exceed 2^53, where a float
  loses digits); an integral decimal ("3.0", "1e3") is that int, as JSON Schema counts 3.0 as an integer; a
  fraction ("4.5") stays the raw string. number types: an integer literal is an exact int, any other finite
  literal a float (what `json.loads` gives: "3.0" → 3.0, "1.25e3" → 1250.0, like SGLang; vLLM and mlx-lm turn
  integral floats into ints, through float, which loses digits); "inf" and "nan" stay strings.
- null: "null" (any case) or "None" (Python's spelling, which models trained on Qwen3.5's `| string` rendering
  write) is None for a nullable schema (`"null"` in `type` or `anyOf`/`oneOf`, or `nullable: true`) and for
  non-string types; for a plain string type it is the text "null" (vLLM). An undeclared key keeps its raw text,
  except "null".
- unions (`type` lists, nested `anyOf`/`oneOf`/`allOf`): the declared types are tried in order and the first that
  reads the value wins (a string type always does), so `anyOf [integer, null]` gives an int and
  `anyOf [string, integer]` keeps "42" a string. A schema without a type is an object if it has `properties`,
  an array if it has `items`, and takes its types from `enum`/`const` values.
- object/array types: `json.loads` (control characters allowed), else a Python literal in which `true`, `false`
  and `null` are also read (models mix the two); a JSON string holding an object is decoded once more (vLLM's
  double-encoding case).

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
- Inside a call nothing is emitted until it ends, so the rules above can wait for the text that decides them.
  Outside a call only a possible marker prefix (`</th`) is held back. A call whose `</function>` is followed by
  other text than `</tool_call>` ends there, and that text is content, so a missing `</tool_call>` cannot hold
  the rest of the answer back. Only a call left open by a model error (above) holds the rest of the turn until
  `finish()` reads it again.
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
import decimal
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

_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
_BOOL_TYPES = frozenset({"boolean", "bool", "binary"})
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_FLOAT_PREFIXES = ("num", "float")
_OBJECT_TYPES = ("object", "dict")  # prefixes: "dict[str, int]" is an object too
_ARRAY_TYPES = ("array", "arr", "list")
_NOT_PARSED = object()

_INTEGER_LITERAL = re.compile(r"[+-]?[0-9]+")
_NUMBER_LITERAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_MAX_INT_DIGITS = 4000  # json.dumps refuses ints longer than 4300 digits (sys.int_info.default_max_str_digits)
_MAX_SCHEMA_DEPTH = 32
_JSON_NAMES = {"true": True, "false": False, "null": None}


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


def _tool_properties(name: str, tools: list[dict] | None) -> dict[str, Any] | None:
    """The `parameters.properties` schema of tool `name` (OpenAI `{"type": "function", "function": …}` or bare);
    None when the tool is unknown or declares no properties, so that any parameter name is plausible."""
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        function = tool.get("function", tool)
        if isinstance(function, dict) and function.get("name") == name:
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            return properties if isinstance(properties, dict) and properties else None
    return None


# --------------------------------------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------------------------------------


_VALUE_KINDS = {str: "string", bool: "boolean", int: "integer", float: "number", dict: "object", list: "array"}


def _schema_types(schema: Any) -> tuple[list[str], bool]:
    """The declared type names of a schema in order, unions flattened, and whether it allows null."""
    kinds: list[str] = []
    nullable = False

    def add(kind: Any) -> None:
        nonlocal nullable
        name = str(kind).strip().lower()
        if name == "null":
            nullable = True
        elif name not in kinds:
            kinds.append(name)

    def visit(node: Any, depth: int) -> None:
        nonlocal nullable
        if not isinstance(node, dict) or depth > _MAX_SCHEMA_DEPTH:
            return
        if node.get("nullable") is True:  # OpenAPI 3.0 spelling
            nullable = True
        declared = node.get("type")
        for kind in declared if isinstance(declared, list) else [declared] if declared is not None else []:
            add(kind)
        unions = [node[key] for key in ("anyOf", "oneOf", "allOf") if isinstance(node.get(key), list)]
        for options in unions:
            for option in options:
                visit(option, depth + 1)
        if declared is not None or unions:
            return
        if "properties" in node:
            add("object")
        elif "items" in node:
            add("array")
        else:
            values = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]] if "const" in node else []
            for value in values:
                add("null" if value is None else _VALUE_KINDS.get(type(value), "string"))

    visit(schema, 0)
    return kinds, nullable


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # NaN/Infinity would make the arguments string invalid JSON


def _json_value(value: str) -> Any:
    try:
        return json.loads(value, strict=False, parse_constant=_reject_constant)  # strict=False: raw newlines
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return _NOT_PARSED


def _is_json_safe(value: Any) -> bool:
    """Whether `json.dumps` writes `value` as strict JSON (a literal_eval result may be a set, bytes, nan…)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


class _JsonNames(ast.NodeTransformer):
    """Reads the JSON names `true`, `false`, `null` in a Python literal: models mix `{'a': true}`."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def _literal_value(value: str) -> Any:
    """A Python literal (single quotes, True/None, tuples), JSON names allowed; only JSON-safe results count."""
    try:
        tree = _JsonNames().visit(ast.parse(value.strip(), mode="eval"))
        parsed = ast.literal_eval(tree)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_PARSED
    return parsed if _is_json_safe(parsed) else _NOT_PARSED


def _structured_value(value: str) -> Any:
    """JSON, else a Python literal; a JSON string that itself holds an object or array is decoded once more."""
    parsed = _json_value(value)
    if parsed is _NOT_PARSED:
        parsed = _literal_value(value)
    if isinstance(parsed, str):  # `"{'key': 'value'}"`: a template that ran json.dumps(str(dict)) (vLLM)
        inner = _json_value(parsed)
        inner = _literal_value(parsed) if inner is _NOT_PARSED else inner
        if isinstance(inner, (dict, list)):
            return inner
    return parsed


def _integer_value(value: str) -> Any:
    """An exact int for an integer literal or an integral decimal ("3.0", "1e3"); else _NOT_PARSED."""
    text = value.strip()
    if _INTEGER_LITERAL.fullmatch(text):
        return int(text) if len(text) <= _MAX_INT_DIGITS else _NOT_PARSED
    if not _NUMBER_LITERAL.fullmatch(text):
        return _NOT_PARSED
    try:
        number = decimal.Decimal(text)  # exact: float("9007199254740993.0") would lose the last digit
        if number != number.to_integral_value() or number.adjusted() >= _MAX_INT_DIGITS:
            return _NOT_PARSED
        return int(number)
    except (decimal.DecimalException, ValueError):
        return _NOT_PARSED


def _number_value(value: str) -> Any:
    """An exact int for an integer literal, a float for any other finite number literal; else _NOT_PARSED."""
    text = value.strip()
    if _INTEGER_LITERAL.fullmatch(text):
        return int(text) if len(text) <= _MAX_INT_DIGITS else _NOT_PARSED
    if _NUMBER_LITERAL.fullmatch(text):
        number = float(text)
        if math.isfinite(number):  # 1e400 is inf, which JSON cannot carry
            return number
    return _NOT_PARSED


def _is_object_kind(kind: str) -> bool:
    return kind.startswith(_OBJECT_TYPES)


def _is_array_kind(kind: str) -> bool:
    return kind.startswith(_ARRAY_TYPES)


def _strict_value(value: str, kind: str) -> Any:
    """`value` read as type `kind`, or _NOT_PARSED when it is not a value of that type."""
    if kind in _STRING_TYPES:
        return value
    if kind.startswith(_INT_PREFIXES):
        return _integer_value(value)
    if kind.startswith(_FLOAT_PREFIXES):
        return _number_value(value)
    if kind in _BOOL_TYPES:
        word = value.strip().lower()
        return word == "true" if word in ("true", "false") else _NOT_PARSED
    parsed = _structured_value(value)
    if _is_object_kind(kind):
        return parsed if isinstance(parsed, dict) else _NOT_PARSED
    if _is_array_kind(kind):
        return parsed if isinstance(parsed, list) else _NOT_PARSED
    return parsed  # an unknown type name ("any"): whatever the text reads as


def _fallback_value(value: str, kind: str) -> Any:
    """What the first declared type makes of a value no declared type reads (the peers' single-type rules)."""
    if kind in _BOOL_TYPES:
        return value.lower() == "true"
    if _is_object_kind(kind) or _is_array_kind(kind):
        parsed = _structured_value(value)
        return value if parsed is _NOT_PARSED else parsed
    return value


def _is_null_text(text: str) -> bool:
    return text.lower() == "null" or text == "None"


def convert_param_value(value: str, schema: Any) -> Any:
    """Convert one raw parameter value by its JSON-schema entry (`schema` is None when the key is undeclared).

    The table of CHAT_FORMAT.md §4.2 with the decisions in the module docstring: exact ints, null for nullable
    and non-string types, unions tried in declared order, JSON names in Python-style containers.
    """
    text = value.strip()
    if schema is None:  # undeclared key: nothing says it is not a string
        return None if text.lower() == "null" else value
    kinds, nullable = _schema_types(schema)
    if _is_null_text(text):
        if nullable or (kinds and not any(kind in _STRING_TYPES for kind in kinds)):
            return None
        if not kinds and text.lower() == "null":
            return None
    if not kinds:  # a declared key without a type: JSON containers are decoded, anything else stays text
        parsed = _json_value(value)
        return parsed if isinstance(parsed, (dict, list)) else value
    for kind in kinds:
        converted = _strict_value(value, kind)
        if converted is not _NOT_PARSED:
            return converted
    return _fallback_value(value, kinds[0])


# --------------------------------------------------------------------------------------------------------
# The structure of one call
# --------------------------------------------------------------------------------------------------------

_BEFORE_FUNCTION = "before function"
_IN_FUNCTION = "in function"  # between parameters
_IN_VALUE = "in value"
_AFTER_FUNCTION = "after function"
_MALFORMED = "malformed"  # skipping to the next </tool_call>
_DONE = "done"

_NEED_MORE = object()  # the text so far cannot decide; more may come
_MAX_TAG_NAME = 256  # a longer "name" is text, so that waiting for its ">" stays bounded
_TAG_NAME = re.compile(rf"[^<>\n]{{0,{_MAX_TAG_NAME}}}")
_WHITESPACE = re.compile(r"\s*")


def _tag_at(text: str, index: int, tag: str, final: bool) -> bool | None:
    """Whether `tag` starts at `index`; None while the text ends inside a prefix of it and more may come."""
    if text.startswith(tag, index):
        return True
    if not final and len(text) - index < len(tag) and tag.startswith(text[index:]):
        return None
    return False


def _named_tag_at(text: str, index: int, prefix: str, final: bool) -> Any:
    """(raw NAME, end) for a `<prefix NAME>` tag at `index` (`<parameter=city>`), None if there is none there, or
    _NEED_MORE. A name runs to the first `>` and holds no `<` or newline."""
    found = _tag_at(text, index, prefix, final)
    if found is not True:
        return _NEED_MORE if found is None else None
    start = index + len(prefix)
    end = _TAG_NAME.match(text, start).end()
    if end < len(text):
        return (text[start:end], end + 1) if text[end] == ">" else None
    return None if final or end - start >= _MAX_TAG_NAME else _NEED_MORE


def _skip_whitespace(text: str, index: int) -> int:
    return _WHITESPACE.match(text, index).end()


def _strip_one_newline(value: str) -> str:
    """The template writes `<parameter=K>\\nV\\n</parameter>`: remove exactly that one newline on each side."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _is_valid_function_name(name: str) -> bool:
    return bool(name) and not any(char.isspace() for char in name)


class _CallScanner:
    """Reads one call's body (the text after `<tool_call>`) piece by piece and finds its structure.

    Every decision depends only on the text and is taken only once the text settles it, so feeding the body
    in any chunking gives the same parameters and the same end (the rules are in the module docstring). Text is
    kept in a short undecided tail plus lists of decided pieces, so a long value costs linear time.

    `recover` is the second reading of a call the first one could not end (see `_recover_call`): a
    `<parameter=…>` inside a value opens no literal block and any name after a `</parameter>` starts a parameter.
    """

    def __init__(self, tools: list[dict] | None, recover: bool = False) -> None:
        self.tools = tools
        self.recover = recover
        self.state = _BEFORE_FUNCTION
        self.name = ""
        self.properties: dict[str, Any] | None = None
        self.parameters: list[tuple[str, str]] = []
        self.error: str | None = None
        self._given: set[str] = set()
        self._current = ""
        self._value: list[str] = []
        self._depth = 0  # literal <parameter=…> blocks open inside the value
        self._tagged = False  # the value holds tag text of its own
        self._tail = ""  # undecided text
        self._raw: list[str] = []  # decided text, for passing a malformed call through
        self._consumed = 0  # length of the decided text
        self._tail_offset = 0  # where the tail starts in the whole body
        self._last_char = ""
        self._error_at: int | None = None  # where the text that made the call malformed starts

    def feed(self, text: str, final: bool = False) -> str | None:
        """Scan the next piece of the body. None while the call goes on; once it ends, the text after its end.

        `final` says no more text will come, so every pending decision is taken.
        """
        tail = self._tail + text
        self._tail_offset = self._consumed
        index = 0
        while self.state is not _DONE:
            state = self.state
            end = self._step(tail, index, final)
            if end > index:
                self._raw.append(tail[index:end])
                self._consumed += end - index
                self._last_char = tail[end - 1]
            if end == index and self.state is state:
                break  # the rest of the tail cannot be decided yet
            index = end
        self._tail = tail[index:]
        if self.state is not _DONE:
            return None
        rest, self._tail = self._tail, ""
        return rest

    def raw_text(self) -> str:
        """Everything fed so far, as written."""
        return "".join(self._raw) + self._tail

    def build(self, lenient: bool = False) -> ToolCall:
        """The call, once scanned to its end; `lenient` also accepts a text that stops inside the function."""
        if self.error is not None:
            # The excerpt is taken now, at the call's end, so that it is the same for every chunking.
            excerpt = "" if self._error_at is None else self.raw_text()[self._error_at :].strip()[:80]
            raise ToolCallParseError(f"{self.error}: {excerpt!r}" if excerpt else self.error)
        if self.state is _BEFORE_FUNCTION:
            raise ToolCallParseError(f"no <function=NAME> in the tool call {self.raw_text().strip()[:80]!r}")
        if self.state is _IN_VALUE and lenient:
            self._value.append(self._tail)
            self._close_value()
            self.state = _IN_FUNCTION
        if self.state is _IN_VALUE or (self.state is _IN_FUNCTION and not lenient):
            raise ToolCallParseError("the tool call ends inside its function")
        properties = self.properties or {}
        arguments = {
            name: convert_param_value(_strip_one_newline(value), properties.get(name))
            for name, value in self.parameters
        }
        return ToolCall(name=self.name, arguments=arguments)

    # -- one step per state: each returns the index it consumed up to ------------------------------------

    def _step(self, text: str, index: int, final: bool) -> int:
        if self.state is _IN_VALUE:
            return self._scan_value(text, index, final)
        if self.state is _IN_FUNCTION:
            return self._scan_function(text, index, final)
        if self.state is _BEFORE_FUNCTION:
            return self._scan_start(text, index, final)
        if self.state is _AFTER_FUNCTION:
            return self._scan_after_function(text, index, final)
        return self._skip_to_call_end(text, index, final)

    def _fail(self, index: int, reason: str) -> int:
        self.error = reason
        self._error_at = self._tail_offset + index
        self.state = _MALFORMED
        return index

    def _scan_start(self, text: str, index: int, final: bool) -> int:
        start = _skip_whitespace(text, index)
        if start == len(text):
            return start
        found = _named_tag_at(text, start, FUNCTION_PREFIX, final)
        if found is _NEED_MORE:
            return start
        if found is None:
            return self._fail(start, "no <function=NAME> at the start of the tool call")
        name, end = found[0].strip(), found[1]
        if not _is_valid_function_name(name):
            return self._fail(start, f"invalid function name {name!r}")
        self.name = name
        self.properties = _tool_properties(name, self.tools)
        self.state = _IN_FUNCTION
        return end

    def _scan_function(self, text: str, index: int, final: bool) -> int:
        start = _skip_whitespace(text, index)
        if start == len(text):
            return start
        found = _named_tag_at(text, start, PARAMETER_PREFIX, final)
        if found is _NEED_MORE:
            return start
        if found is not None:
            name = found[0].strip()
            if not name:
                return self._fail(start, "a <parameter=> tag has no name")
            self._open_value(name)
            return found[1]
        waiting = False
        for tag, state in ((FUNCTION_END, _AFTER_FUNCTION), (TOOL_CALL_END, _DONE)):  # </function> may be missing
            hit = _tag_at(text, start, tag, final)
            if hit:
                self.state = state
                return start + len(tag)
            waiting |= hit is None
        if waiting:
            return start
        return self._fail(start, "unexpected text in the function body")

    def _scan_after_function(self, text: str, index: int, final: bool) -> int:
        start = _skip_whitespace(text, index)
        if start == len(text):
            return len(text) if final else index  # the whitespace may still precede </tool_call>
        hit = _tag_at(text, start, TOOL_CALL_END, final)
        if hit is None:
            return index
        self.state = _DONE
        # Without </tool_call>, the call ends at </function> and what follows is the answer's content.
        return start + len(TOOL_CALL_END) if hit else index

    def _skip_to_call_end(self, text: str, index: int, final: bool) -> int:
        end = text.find(TOOL_CALL_END, index)
        if end != -1:
            self.state = _DONE
            return end + len(TOOL_CALL_END)
        if final:
            return len(text)
        tail = text[max(index, len(text) - len(TOOL_CALL_END)) :]
        return len(text) - _partial_marker_length(tail, (TOOL_CALL_END,))

    # -- values ---------------------------------------------------------------------------------------------

    def _open_value(self, name: str) -> None:
        if name in self._given and self.error is None:  # only a recovering reading takes a given name
            self.error = f"parameter {name!r} is given twice"
        self._current = name
        self._given.add(name)
        self._value = []
        self._depth = 0
        self._tagged = False
        self.state = _IN_VALUE

    def _close_value(self) -> None:
        self.parameters.append((self._current, "".join(self._value)))
        self._value = []

    def _is_next_parameter(self, name: str) -> bool:
        """A declared (or, for an unknown schema, any) parameter that this call has not given yet."""
        if self.recover:
            return bool(name)
        return bool(name) and name not in self._given and (self.properties is None or name in self.properties)

    def _may_lack_close(self, text: str, index: int) -> bool:
        """A missing </parameter> is tolerated only in a plain value, at a line start."""
        previous = text[index - 1] if index > 0 else self._last_char
        return not self._tagged and previous == "\n"

    def _literal(self, text: str, start: int, end: int) -> int:
        self._tagged = True
        self._value.append(text[start:end])
        return end

    def _scan_value(self, text: str, index: int, final: bool) -> int:
        while True:
            tag = text.find("<", index)
            if tag == -1:
                tag = len(text)
            self._value.append(text[index:tag])
            if tag == len(text):
                return tag
            end = self._value_tag(text, tag, final)
            if end is None or self.state is not _IN_VALUE:
                return tag if end is None else end
            index = end

    def _value_tag(self, text: str, index: int, final: bool) -> int | None:
        """Handle the `<` at `index` inside a value: the index after what it starts, or None to wait."""
        hit = _tag_at(text, index, PARAMETER_END, final)
        if hit is None:
            return None
        if hit:
            end = index + len(PARAMETER_END)
            if self._depth > 0:  # closes a block opened inside the value
                self._depth -= 1
                return self._literal(text, index, end)
            closes = self._closes_value(text, end, final)
            if closes is None:
                return None
            if closes:
                self._close_value()
                self.state = _IN_FUNCTION
                return end
            return self._literal(text, index, end)
        found = _named_tag_at(text, index, PARAMETER_PREFIX, final)
        if found is _NEED_MORE:
            return None
        if found is not None:
            name, end = found[0].strip(), found[1]
            if self._may_lack_close(text, index) and self._is_next_parameter(name):
                self._close_value()
                self._open_value(name)
                return end
            self._depth += 0 if self.recover else 1
            return self._literal(text, index, end)
        hit = _tag_at(text, index, FUNCTION_END, final)
        if hit is None:
            return None
        if hit:
            end = index + len(FUNCTION_END)
            if self._may_lack_close(text, index):
                ends = self._call_end_follows(text, end, final)
                if ends is None:
                    return None
                if ends:
                    self._close_value()
                    self.state = _AFTER_FUNCTION
                    return end
            return self._literal(text, index, end)
        for tag in (TOOL_CALL_START, TOOL_CALL_END, FUNCTION_PREFIX):
            hit = _tag_at(text, index, tag, final)
            if hit is None:
                return None
            if hit:
                return self._literal(text, index, index + len(tag))
        self._value.append("<")
        return index + 1

    def _closes_value(self, text: str, index: int, final: bool) -> bool | None:
        """After a `</parameter>` at depth 0: is it structural? None while the text cannot tell."""
        start = _skip_whitespace(text, index)
        if start == len(text):
            return True if final else None
        found = _named_tag_at(text, start, PARAMETER_PREFIX, final)
        if found is _NEED_MORE:
            return None
        if found is not None:
            return self._is_next_parameter(found[0].strip())
        waiting = False
        for tag in (FUNCTION_END, TOOL_CALL_END):
            hit = _tag_at(text, start, tag, final)
            if hit:
                return True
            waiting |= hit is None
        return None if waiting else False

    def _call_end_follows(self, text: str, index: int, final: bool) -> bool | None:
        """After a `</function>` inside a value lacking its `</parameter>`: does the call end here?"""
        start = _skip_whitespace(text, index)
        if start == len(text):
            return True if final else None
        return _tag_at(text, start, TOOL_CALL_END, final)


def parse_tool_call(text: str, tools: list[dict] | None = None) -> ToolCall:
    """Parse one `<tool_call>` block (with or without its markers) into a ToolCall.

    `tools` is the request's tool list; its parameter schemas decide how values convert. A function not in
    `tools` still parses, with string values; the server decides whether to accept it. A missing
    `</function>` or `</parameter>` is tolerated as in vLLM. Raises ToolCallParseError when there is no
    `<function=NAME>`, the name is empty or contains whitespace, or text other than whitespace surrounds the
    function or its parameters.
    """
    body = text.lstrip()
    if body.startswith(TOOL_CALL_START):
        body = body[len(TOOL_CALL_START) :]
    scanner = _CallScanner(tools)
    rest = scanner.feed(body, final=True)
    if rest is None and scanner.state is _IN_VALUE:
        scanner, rest = _recover_call(body, tools) or (scanner, rest)
    if rest is not None and rest.strip() and scanner.error is None:
        raise ToolCallParseError(f"unexpected text {rest.strip()[:80]!r} after the function")
    return scanner.build(lenient=True)


def _recover_call(body: str, tools: list[dict] | None) -> tuple[_CallScanner, str] | None:
    """Read a complete call body again when the first reading found no end: (scanner, text after the call).

    The first reading takes a `<parameter=…>` inside a value for quoted text, whose `</parameter>` is quoted too,
    so a model that repeats or invents a parameter leaves its call open to the end of the turn. The second
    reading takes such tags as parameters, like the peers; a repeated name then fails the call (`build`). None
    when the call does not end under this reading either.
    """
    scanner = _CallScanner(tools, recover=True)
    rest = scanner.feed(body, final=True)
    if rest is None and scanner.state is not _AFTER_FUNCTION:
        return None
    return scanner, rest or ""


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
    `initial_phase`), else "content". `tools` is the request's tool list, for value types and parameter names.
    Outside a tool call, text that could be the start of a marker (`</th`) is held back until the next delta
    decides; everything else is emitted at once. A call is emitted whole when it ends.
    `parse_tool_calls=False` treats `<tool_call>` as plain text (e.g. for `tool_choice="none"`).
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
        self._call: _CallScanner | None = None
        self._segment_start = True  # leading newlines of a segment are dropped
        self._events: list[Event] = []
        tool_marker = (TOOL_CALL_START,) if parse_tool_calls else ()
        self._markers = {
            REASONING: (THINK_END, THINK_START) + (tool_marker if tool_calls_in_reasoning else ()),
            CONTENT: (THINK_START, THINK_END) + tool_marker,
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
        while self._phase == TOOL_CALL:
            self._pending = self._close_unterminated_call()
            self._scan(final=True)
        return self._take_events()

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _scan(self, final: bool) -> None:
        while True:
            if self._phase == TOOL_CALL:
                rest = self._call.feed(self._pending, final)
                self._pending = ""
                if rest is None:
                    return
                self._close_call()
                self._pending = rest
                continue
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
            self._call = _CallScanner(self.tools)
            return
        # THINK_END ends reasoning; inside content it is a stray marker and is simply dropped.
        self._phase = REASONING if marker == THINK_START else CONTENT
        self._segment_start = True

    def _text(self, text: str) -> None:
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

    def _end_call(self) -> _CallScanner:
        call, self._call = self._call, None
        self._phase = CONTENT
        return call

    def _close_call(self) -> None:
        self._emit_call(self._end_call())

    def _emit_call(self, scanner: _CallScanner) -> None:
        try:
            call = scanner.build()
        except ToolCallParseError as exc:
            self._degrade(TOOL_CALL_START + scanner.raw_text(), str(exc))
            return
        self._events.append(Event(TOOL_CALL, tool_call=call))
        self._segment_start = True  # drop the newline the model writes between calls

    def _close_unterminated_call(self) -> str:
        """Settle a call still open when the turn ends; returns the text after it, to be scanned as content."""
        scanner = self._end_call()
        recovered = _recover_call(scanner.raw_text(), self.tools) if scanner.state is _IN_VALUE else None
        if recovered is not None:
            self._emit_call(recovered[0])
            return recovered[1]
        if scanner.state is _AFTER_FUNCTION and scanner.error is None:
            self._emit_call(scanner)
        else:
            self._degrade(TOOL_CALL_START + scanner.raw_text(), "the turn ended inside an unfinished <tool_call>")
        return ""

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
