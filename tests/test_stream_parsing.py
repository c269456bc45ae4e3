"""Streaming detokenizer, tool-call parser and the reasoning/content/tool-call stream state machine.

The detokenizer is checked against the real Qwen3.6 tokenizer (built offline, see tokenizer_fixture): every
delta must be final text (a prefix of the full decode, never a provisional U+FFFD) and the deltas must join to
`processor.decode(ids)`. The StreamParser is checked by feeding the same turns in every chunking: the events,
joined per phase, must equal the non-streamed `parse_full`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import zlib
from pathlib import Path

import pytest
from tokenizer_fixture import qwen36_processor_dir_or_skip

from mlx_qwen36.detokenizer import MAX_WINDOW, StreamingDetokenizer
from mlx_qwen36.processor import Processor, load_processor
from mlx_qwen36.tool_parser import (
    CONTENT,
    REASONING,
    TOOL_CALL,
    Event,
    ParsedOutput,
    StreamParser,
    ToolCall,
    ToolCallParseError,
    convert_param_value,
    initial_phase,
    parse_full,
    parse_tool_call,
    tool_call_deltas,
)


@pytest.fixture(scope="session")
def processor(shared_dir: Path) -> Processor:
    return load_processor(qwen36_processor_dir_or_skip(shared_dir))


MIXED_TEXT = (
    "<think>\n用户想学做菜：教我做红烧鱼。Family emoji 👩‍👩‍👧 and flags 🇫🇷, skin tone 👍🏽.\n</think>\n\n"
    "好的！红烧鱼做法如下 🐟：\n\n"
    "```python\ndef cook(fish: str) -> str:\n\tif fish:\n        return f'{fish} 🔥'\n    return ''\n```\n"
    "  trailing  spaces  \n\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n東京\n</parameter>\n"
    "</function>\n</tool_call><|im_end|>\n<|endoftext|>Ünïcödé ñ é (e + combining ́) 𝔘𝔫𝔦"
)


# --------------------------------------------------------------------------------------------------------
# StreamingDetokenizer
# --------------------------------------------------------------------------------------------------------


def _stream(detokenizer: StreamingDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detokenizer.add_token(token_id) for token_id in ids]
    deltas.append(detokenizer.finalize())
    return deltas


def _assert_final_deltas(deltas: list[str], expected: str) -> None:
    """Each delta is encodable UTF-8 and extends a prefix of the full decode; together they are the decode."""
    joined = ""
    for delta in deltas:
        delta.encode("utf-8")  # raises on lone surrogates
        joined += delta
        assert expected.startswith(joined), f"streamed text diverged: {joined[-20:]!r}"
    assert joined == expected


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_detokenizer_mixed_text_matches_decode(processor: Processor, skip_special_tokens: bool) -> None:
    ids = processor.encode(MIXED_TEXT)
    expected = processor.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "\ufffd" not in expected
    detokenizer = StreamingDetokenizer(processor, skip_special_tokens=skip_special_tokens)
    deltas = _stream(detokenizer, ids)
    _assert_final_deltas(deltas, expected)
    assert not any("\ufffd" in delta for delta in deltas)
    assert ("<|im_end|>" in expected) is (not skip_special_tokens)
    assert "<think>" in expected  # not a special token: it survives skipping
    assert detokenizer.tokens == ids


def test_detokenizer_holds_split_characters(processor: Processor) -> None:
    ids = processor.encode("👩‍👩‍👧")
    assert len(ids) > 3  # byte-level BPE splits the ZWJ sequence across many tokens
    detokenizer = StreamingDetokenizer(processor.tokenizer)  # a bare tokenizers.Tokenizer works too
    deltas = _stream(detokenizer, ids)
    assert all(delta == "" or "\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == "👩‍👩‍👧"
    assert deltas[0] == ""  # the first token is only part of 👩


def test_detokenizer_invalid_bytes_match_decode(processor: Processor) -> None:
    """Random byte fragments and invalid sequences: the deltas still join to the lossy full decode."""
    fragments = [i for i in range(256) if processor.decode([i]) == "\ufffd"]
    words = processor.encode("红烧鱼 a 👩‍👧<think>")
    rng = random.Random(0)
    for length in [*range(1, 61, 3), *range(100, 400, 50)]:  # long runs exercise the window trimming
        ids = [rng.choice(fragments * 4 + words) for _ in range(length)]
        expected = processor.decode(ids)
        deltas = _stream(StreamingDetokenizer(processor), ids)
        _assert_final_deltas(deltas, expected)


def test_detokenizer_window_stays_bounded_on_garbage(processor: Processor) -> None:
    continuation = next(
        i for i in range(256) if processor.decode([i]) == "\ufffd" and processor.decode([i, i]) == "\ufffd" * 2
    )
    detokenizer = StreamingDetokenizer(processor)
    ids = [continuation] * 500
    deltas = []
    for token_id in ids:
        deltas.append(detokenizer.add_token(token_id))
        assert len(detokenizer._window) <= MAX_WINDOW + 1  # private, but the point: no O(n) re-decoding
    deltas.append(detokenizer.finalize())
    assert "".join(deltas) == processor.decode(ids)


def _byte_token(processor: Processor, data: bytes) -> int:
    """The id of the byte-level BPE token spelling exactly `data` (GPT-2's byte-to-unicode alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    token_id = processor.tokenizer.token_to_id("".join(alphabet[b] for b in data))
    assert token_id is not None, data
    return token_id


def test_detokenizer_trims_window_at_safe_cut(processor: Processor) -> None:
    """A long invalid run, then ' ' + a 3-byte character split over three tokens as the window overflows.

    The cut must not separate the character's lead byte from its continuation, and text already emitted from
    the window (the space) must not be emitted twice.
    """
    ids = [_byte_token(processor, b"\x80")] * (MAX_WINDOW - 1)
    ids += [_byte_token(processor, b" \xe2"), _byte_token(processor, b"\x80"), _byte_token(processor, b"\x9c")]
    expected = processor.decode(ids)
    assert expected.endswith(" \u201c")
    _assert_final_deltas(_stream(StreamingDetokenizer(processor), ids), expected)


class _CountingTokenizer:
    """Wraps a tokenizer and counts how many token ids `decode` is asked to read."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer_ = tokenizer
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded += len(ids)
        return self.tokenizer_.decode(ids, skip_special_tokens=skip_special_tokens)


def test_detokenizer_is_linear(processor: Processor) -> None:
    ids = processor.encode(MIXED_TEXT * 40)
    counting = _CountingTokenizer(processor.tokenizer)
    deltas = _stream(StreamingDetokenizer(counting), ids)
    assert "".join(deltas) == processor.decode(ids)
    assert counting.decoded <= 4 * len(ids), "the detokenizer re-decodes history"


def test_detokenizer_reset(processor: Processor) -> None:
    detokenizer = StreamingDetokenizer(processor)
    detokenizer.add_tokens(processor.encode("👩")[:1])
    detokenizer.reset()
    assert detokenizer.add_tokens(processor.encode("abc")) + detokenizer.finalize() == "abc"
    with pytest.raises(TypeError):
        StreamingDetokenizer(object())


# --------------------------------------------------------------------------------------------------------
# Tool-call value conversion (CHAT_FORMAT.md §4.2)
# --------------------------------------------------------------------------------------------------------

CONVERSIONS = [
    # (schema or None for an undeclared key, raw value, expected)
    ({"type": "string"}, "null", "null"),  # a plain string keeps the text (vLLM); nullable ones give None
    ({"type": "integer"}, "NULL", None),
    (None, "null", None),
    (None, "42", "42"),
    (None, '{"a": 1}', '{"a": 1}'),
    ({"type": "string"}, "42", "42"),
    ({"type": "str"}, "true", "true"),
    ({"type": "text"}, "[1]", "[1]"),
    ({"type": "varchar"}, " x ", " x "),
    ({"type": "char"}, "c", "c"),
    ({"type": "enum"}, "7", "7"),
    ({"type": "integer"}, "42", 42),
    ({"type": "int"}, "-3", -3),
    ({"type": "int64"}, "7", 7),
    ({"type": "uint8"}, "255", 255),
    ({"type": "long"}, "9000000000", 9000000000),
    ({"type": "short"}, "2", 2),
    ({"type": "unsigned int"}, "5", 5),
    ({"type": "integer"}, "4.5", "4.5"),
    ({"type": "integer"}, "many", "many"),
    ({"type": "number"}, "2.5", 2.5),
    ({"type": "number"}, "3.0", 3.0),  # a number keeps the form json.loads gives it (SGLang)
    ({"type": "number"}, "1e3", 1000.0),
    ({"type": "number"}, "9007199254740993", 9007199254740993),  # 2^53 + 1, exact
    ({"type": "integer"}, "3.0", 3),  # JSON Schema counts 3.0 as an integer
    ({"type": "float"}, "-0.25", -0.25),
    ({"type": "number"}, "abc", "abc"),
    ({"type": "number"}, "inf", "inf"),
    ({"type": "number"}, "nan", "nan"),
    ({"type": "boolean"}, "true", True),
    ({"type": "boolean"}, "True", True),
    ({"type": "bool"}, "false", False),
    ({"type": "binary"}, "yes", False),
    ({"type": "object"}, '{"a": [1, 2], "b": "中"}', {"a": [1, 2], "b": "中"}),
    ({"type": "array"}, "[1, 2, 3]", [1, 2, 3]),
    ({"type": "arr"}, "[true]", [True]),
    ({"type": "dict"}, "{'a': 1}", {"a": 1}),
    ({"type": "list[str]"}, "['x', 'y']", ["x", "y"]),
    ({"type": "object"}, "not json", "not json"),
    ({"type": "array"}, "{1, 2}", "{1, 2}"),  # a Python set is not JSON: keep the raw string
    ({"type": "array"}, "[NaN]", "[NaN]"),  # NaN would make invalid JSON
    ({"description": "no type"}, '{"k": 1}', {"k": 1}),
    ({"description": "no type"}, "[1]", [1]),
    ({"description": "no type"}, "12", "12"),
    ({"description": "no type"}, "plain", "plain"),
    ({"type": ["integer", "null"]}, "5", 5),
    ({"type": ["null", "string"]}, "5", "5"),
    ({"anyOf": [{"type": "null"}, {"type": "number"}]}, "1.5", 1.5),
    ({"type": "any"}, "123", 123),
    ({"type": "any"}, "hello", "hello"),
]


@pytest.mark.parametrize(("schema", "raw", "expected"), CONVERSIONS)
def test_convert_param_value(schema, raw: str, expected) -> None:
    value = convert_param_value(raw, schema)
    assert value == expected
    assert type(value) is type(expected)


def _tools(properties: dict, name: str = "f") -> list[dict]:
    return [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties}}}
    ]


def _call(name: str, params: dict[str, str]) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def test_conversion_table_through_parse_tool_call() -> None:
    """Each table row, as a parameter of a real call, converts the same way.

    Undeclared keys go one per call: after the first parameter, an undeclared name is text of the value before it.
    """
    declared = [(f"p{i}", raw, expected) for i, (schema, raw, expected) in enumerate(CONVERSIONS) if schema is not None]
    properties = {f"p{i}": schema for i, (schema, _, _) in enumerate(CONVERSIONS) if schema is not None}
    call = parse_tool_call(_call("f", {key: raw for key, raw, _ in declared}), _tools(properties))
    assert call.arguments == {key: expected for key, _, expected in declared}
    assert [type(value) for value in call.arguments.values()] == [type(expected) for _, _, expected in declared]
    json.loads(call.to_openai()["function"]["arguments"])
    for schema, raw, expected in CONVERSIONS:
        if schema is None:
            assert parse_tool_call(_call("f", {"extra": raw}), _tools(properties)).arguments == {"extra": expected}


def test_value_newlines_strip_exactly_one() -> None:
    text = "<tool_call>\n<function=write>\n<parameter=body>\n\nline 1\n\n  line 3\n\n</parameter>\n</function>\n"
    text += "</tool_call>"
    assert parse_tool_call(text).arguments == {"body": "\nline 1\n\n  line 3\n"}
    compact = "<tool_call><function=write><parameter=body>x</parameter></function></tool_call>"
    assert parse_tool_call(compact).arguments == {"body": "x"}


def test_multiple_parameters_and_multiline_code() -> None:
    code = 'def f():\n    """<b>doc</b>"""\n\n    return "</parameter> inside"\n'
    tools = _tools({"path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "integer"}}, "write")
    text = _call("write", {"path": "a/b.py", "content": code, "mode": "644"})
    call = parse_tool_call(text, tools)
    assert call.name == "write"
    assert call.arguments == {"path": "a/b.py", "content": code, "mode": 644}
    assert list(call.arguments) == ["path", "content", "mode"]


def test_unknown_function_and_no_tools_keep_strings() -> None:
    tools = _tools({"n": {"type": "integer"}}, "known")
    assert parse_tool_call(_call("other", {"n": "1"}), tools).arguments == {"n": "1"}
    assert parse_tool_call(_call("known", {"n": "1"}), None).arguments == {"n": "1"}
    bare = [{"name": "known", "parameters": {"properties": {"n": {"type": "integer"}}}}]  # no OpenAI wrapper
    assert parse_tool_call(_call("known", {"n": "1"}), bare).arguments == {"n": 1}


def test_tolerated_omissions() -> None:
    missing_parameter_end = "<function=f>\n<parameter=a>\n1\n<parameter=b>\n2\n</function>"
    assert parse_tool_call(missing_parameter_end).arguments == {"a": "1", "b": "2"}
    missing_function_end = "<tool_call>\n<function=f>\n<parameter=a>\nx\n</parameter>\n</tool_call>"
    assert parse_tool_call(missing_function_end).arguments == {"a": "x"}


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',  # Hermes JSON, not Qwen3-Coder XML
        "<tool_call>\nsay <function=f>\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\n</function>\ntrailing\n</tool_call>",
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        "<tool_call>\n<function=two words>\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\nstray\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=f>\n<parameter=>\n1\n</parameter>\n</function>\n</tool_call>",
    ],
)
def test_malformed_call_raises(text: str) -> None:
    with pytest.raises(ToolCallParseError):
        parse_tool_call(text)


def test_tool_call_openai_shape_and_deltas() -> None:
    call = parse_tool_call(
        _call("get_weather", {"city": '東京 "quoted"', "n": '[1, {"a": null}]'}),
        _tools({"city": {"type": "string"}, "n": {"type": "array"}}, "get_weather"),
    )
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert call.id != parse_tool_call(_call("g", {})).id
    wire = call.to_openai()
    assert wire["type"] == "function" and wire["id"] == call.id
    assert wire["function"]["name"] == "get_weather"
    assert "東京" in wire["function"]["arguments"]  # ensure_ascii=False
    assert json.loads(wire["function"]["arguments"]) == {"city": '東京 "quoted"', "n": [1, {"a": None}]}

    deltas = tool_call_deltas(call, 2)
    assert deltas[0] == {
        "index": 2,
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(delta["index"] == 2 for delta in deltas)
    assert all(set(delta) == {"index", "function"} for delta in deltas[1:])
    joined = "".join(delta["function"]["arguments"] for delta in deltas)
    assert json.loads(joined) == call.arguments
    assert json.loads("".join(d["function"]["arguments"] for d in tool_call_deltas(ToolCall("f", {}), 0))) == {}


# --------------------------------------------------------------------------------------------------------
# StreamParser
# --------------------------------------------------------------------------------------------------------

WEATHER_TOOLS = _tools(
    {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}}, "get_weather"
) + _tools({"path": {"type": "string"}, "content": {"type": "string"}}, "write_file")

# A file the model writes may itself hold tool-call syntax (vLLM's qwen3 xml/coder shared suite).
NESTED_CALL = _call("write_file", {"path": "literal/value.txt", "content": "hello"})
TEMPLATE_LINES = 'T = """\n</parameter>\n<parameter=new_string>\nx\n</parameter>\n"""'

SAMPLES = [
    # (initial phase, text)
    (
        REASONING,
        "The user wants weather.\nI'll call the tool.\n</think>\n\nSure, checking.\n\n"
        + _call("get_weather", {"city": "Paris", "days": "3"})
        + "\n"
        + _call("get_weather", {"city": "東京", "opts": '{"u": "c"}'}),
    ),
    (REASONING, "短い思考 👩‍👩‍👧</think>\n\n答案：红烧鱼 🐟。"),
    (REASONING, "truncated reasoning with no end </th"),
    (CONTENT, "<think>\nself-opened block\n</think>\n\nanswer < 3 and <b>bold</b> and a lone < or </"),
    (CONTENT, "No thinking here, `x <tool` literal text and <think without close"),
    (CONTENT, "before " + _call("f", {"a": "1"}) + " between " + _call("g", {"b": "x\ny"}) + " after"),
    (
        REASONING,
        "mentions <tool_call> in prose\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n"
        "</parameter>\n</function>\n</tool_call>\nthen content",
    ),
    (CONTENT, "Trying:\n<tool_call>\n<broken>\n</tool_call>\n\nafter the broken call"),
    (CONTENT, "unclosed call at the end " + _call("f", {"a": "1"})[: -len("\n</tool_call>")]),
    (CONTENT, "truncated call <tool_call>\n<function=f>\n<parameter=a>\n1"),
    (REASONING, "r</think></think>c<think>r2</think>\n\n\n\nc2<think>"),
    (REASONING, "<think><tool_call>\n\n<tool_call>\n<functio"),
    # Tag text inside values: only structural tags end a value or the call (see the tool_parser docstring).
    (REASONING, "I'll write it.</think>\n" + _call("write_file", {"path": "t.py", "content": f"d = '{NESTED_CALL}'"})),
    (CONTENT, _call("write_file", {"path": "t.py", "content": TEMPLATE_LINES}) + "\nDone."),
    (
        CONTENT,
        _call("f", {"bar": "baz"}) + "\n\n" + _call("write_file", {"content": f"t = '{_call('f', {'b': 'z'})}'"}),
    ),
    # A missing </parameter> (vLLM, SGLang), then a missing </tool_call> followed by the answer.
    (
        CONTENT,
        "Checking:\n" + _call("get_weather", {"city": "Dallas", "days": "3"}).replace("Dallas\n</parameter>", "Dallas"),
    ),
    (CONTENT, _call("get_weather", {"city": "Oslo"})[: -len("</tool_call>")] + "The answer: <b>sun</b>."),
]


def _collect(events: list[Event]) -> ParsedOutput:
    out = ParsedOutput()
    for event in events:
        if event.phase == REASONING:
            out.reasoning += event.text
        elif event.phase == CONTENT:
            out.content += event.text
        else:
            assert event.phase == TOOL_CALL and event.text == ""
            out.tool_calls.append(event.tool_call)
    return out


def _feed_chunks(chunks: list[str], phase: str, tools=None, **options) -> tuple[ParsedOutput, list[Event]]:
    parser = StreamParser(phase, tools, **options)
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.finish())
    return _collect(events), events


def _same(a: ParsedOutput, b: ParsedOutput) -> None:
    assert (a.reasoning, a.content) == (b.reasoning, b.content)
    assert [(c.name, c.arguments) for c in a.tool_calls] == [(c.name, c.arguments) for c in b.tool_calls]


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, position = [], 0
    while position < len(text):
        size = rng.randint(1, 9)
        chunks.append(text[position : position + size])
        position += size
    return chunks


@pytest.mark.parametrize(("phase", "text"), SAMPLES)
def test_stream_equals_full_parse_in_every_chunking(phase: str, text: str) -> None:
    expected = parse_full(text, WEATHER_TOOLS, phase)
    _same(_feed_chunks([text], phase, WEATHER_TOOLS)[0], expected)
    _same(_feed_chunks(list(text), phase, WEATHER_TOOLS)[0], expected)
    for cut in range(len(text) + 1):
        _same(_feed_chunks([text[:cut], text[cut:]], phase, WEATHER_TOOLS)[0], expected)
    rng = random.Random(zlib.crc32(text.encode()))
    for _ in range(25):
        _same(_feed_chunks(_random_chunks(text, rng), phase, WEATHER_TOOLS)[0], expected)


def test_stream_through_real_tokenizer(processor: Processor) -> None:
    """Token ids → detokenizer → parser gives the same result as parsing the decoded text."""
    for phase, text in SAMPLES + [(CONTENT, MIXED_TEXT)]:
        ids = processor.encode(text)
        detokenizer = StreamingDetokenizer(processor)
        parser = StreamParser(phase, WEATHER_TOOLS)
        events = [event for token_id in ids for event in parser.feed(detokenizer.add_token(token_id))]
        events += parser.feed(detokenizer.finalize()) + parser.finish()
        _same(_collect(events), parse_full(processor.decode(ids), WEATHER_TOOLS, phase))


def test_tag_text_samples_parse_right() -> None:
    """The samples with tag text inside values: what the (chunking-independent) parse gives."""
    expected = [
        ("I'll write it.", "", [("write_file", {"path": "t.py", "content": f"d = '{NESTED_CALL}'"})]),
        ("", "Done.", [("write_file", {"path": "t.py", "content": TEMPLATE_LINES})]),
        ("", "", [("f", {"bar": "baz"}), ("write_file", {"content": f"t = '{_call('f', {'b': 'z'})}'"})]),
        ("", "Checking:\n", [("get_weather", {"city": "Dallas", "days": 3})]),
        ("", "The answer: <b>sun</b>.", [("get_weather", {"city": "Oslo"})]),
    ]
    for (phase, text), (reasoning, content, calls) in zip(SAMPLES[12:], expected, strict=True):
        out = parse_full(text, WEATHER_TOOLS, phase)
        assert (out.reasoning, out.content) == (reasoning, content)
        assert [(call.name, call.arguments) for call in out.tool_calls] == calls


def test_markers_never_emitted_and_whitespace() -> None:
    out = parse_full(SAMPLES[0][1], WEATHER_TOOLS, REASONING)
    assert out.reasoning == "The user wants weather.\nI'll call the tool.\n"
    assert out.content == "Sure, checking.\n\n"  # leading "\n\n" after </think> dropped; nothing between calls
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("get_weather", {"city": "東京", "opts": {"u": "c"}}),
    ]
    for phase, text in SAMPLES[:7]:
        out = parse_full(text, WEATHER_TOOLS, phase)
        for marker in ("<think>", "</think>", "</tool_call>"):
            assert marker not in out.reasoning + out.content


@pytest.mark.parametrize(
    ("phase", "text", "reasoning", "content"),
    [
        (REASONING, "a</think>\n\nb", "a", "b"),
        (REASONING, "only thinking, cut off", "only thinking, cut off", ""),
        (REASONING, "</think>\n\nanswer", "", "answer"),
        (CONTENT, "answer", "", "answer"),
        (CONTENT, "<think>\nx\n</think>\n\ny", "x\n", "y"),
        (CONTENT, "\n\nanswer\n\n  indented\n", "", "answer\n\n  indented\n"),
        (CONTENT, "a</think>b", "", "ab"),  # a stray </think> in content is dropped
        (REASONING, "x<think>y</think>z", "xy", "z"),
        (REASONING, "a < b </thinking> c", "a < b </thinking> c", ""),
    ],
)
def test_reasoning_transitions(phase: str, text: str, reasoning: str, content: str) -> None:
    out = parse_full(text, None, phase)
    assert (out.reasoning, out.content, out.tool_calls) == (reasoning, content, [])


def test_hold_back_only_marker_prefixes() -> None:
    parser = StreamParser(REASONING)
    assert parser.feed("Hello </th") == [Event(REASONING, "Hello ")]
    assert parser.feed("ink>") == []
    assert parser.phase == CONTENT
    assert parser.feed("\n\nHi <") == [Event(CONTENT, "Hi ")]
    assert parser.feed("3 is") == [Event(CONTENT, "<3 is")]
    assert parser.feed(" done") == [Event(CONTENT, " done")]
    assert parser.feed("<tool_") == []
    assert parser.feed("call>\n<function=f>\n") == []
    assert parser.phase == TOOL_CALL
    events = parser.feed("</function>\n</tool_call>")
    assert [(e.phase, e.tool_call.name) for e in events] == [(TOOL_CALL, "f")]
    assert parser.feed("x</") == [Event(CONTENT, "x")]
    assert parser.finish() == [Event(CONTENT, "</")]


def test_initial_phase_from_rendered_prompts(processor: Processor) -> None:
    messages = [{"role": "user", "content": "教我做红烧鱼"}]
    thinking = processor.apply_chat_template(messages, tokenize=False)
    assert thinking.endswith("<think>\n") and initial_phase(thinking) == REASONING
    plain = processor.apply_chat_template(messages, enable_thinking=False, tokenize=False)
    assert plain.endswith("</think>\n\n") and initial_phase(plain) == CONTENT
    assert initial_phase("no markers at all") == CONTENT
    with pytest.raises(ValueError):
        StreamParser("tool_call")


def test_template_round_trip(processor: Processor) -> None:
    """Tool calls rendered by the official template parse back to the same arguments."""
    arguments = {"city": "東京", "days": 3, "opts": {"units": "c", "list": [1, 2]}, "flag": True, "ratio": 0.5}
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "days": {"type": "integer"},
                        "opts": {"type": "object"},
                        "flag": {"type": "boolean"},
                        "ratio": {"type": "number"},
                    },
                },
            },
        }
    ]
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "reasoning_content": "need the tool",
            "content": "Checking.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            ],
        },
    ]
    prompt = processor.apply_chat_template(messages, tools=tools, add_generation_prompt=False, tokenize=False)
    turn = prompt.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    out = parse_full(turn, tools, CONTENT)
    assert out.reasoning == "need the tool\n"
    assert out.content == "Checking.\n\n"
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", arguments),
        ("get_weather", {"city": "Oslo"}),
    ]


def test_tool_calls_inside_reasoning() -> None:
    call = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>"
    text = "thinking <tool_call> is the tag\n" + call + "\nok"
    out = parse_full(text, None, REASONING)
    assert out.reasoning == "thinking <tool_call> is the tag\n"
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("f", {"a": "1"})]
    assert out.content == "ok"
    legacy = parse_full(text, None, REASONING, tool_calls_in_reasoning=False)
    assert legacy.reasoning == text and legacy.content == "" and legacy.tool_calls == []


def test_parse_tool_calls_disabled() -> None:
    text = "a " + _call("f", {}) + " b"
    out = parse_full(text, None, CONTENT, parse_tool_calls=False)
    assert out.content == text and out.tool_calls == []


def test_malformed_call_degrades_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    raw = "<tool_call>\n<broken>\n</tool_call>"
    with caplog.at_level(logging.WARNING, logger="mlx_qwen36.tool_parser"):
        out = parse_full("Trying:\n" + raw + "\nafter", None, CONTENT)
    assert out.content == "Trying:\n" + raw + "\nafter"
    assert out.tool_calls == []
    assert any("malformed tool call" in record.getMessage() for record in caplog.records)


def test_unclosed_call_at_finish(caplog: pytest.LogCaptureFixture) -> None:
    complete = _call("f", {"a": "1"})[: -len("</tool_call>")]
    with caplog.at_level(logging.WARNING, logger="mlx_qwen36.tool_parser"):
        out = parse_full(complete, None, CONTENT)
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("f", {"a": "1"})]
    assert not caplog.records

    truncated = "text <tool_call>\n<function=f>\n<parameter=a>\n1"
    with caplog.at_level(logging.WARNING, logger="mlx_qwen36.tool_parser"):
        out = parse_full(truncated, None, CONTENT)
    assert out.content == truncated and out.tool_calls == []
    assert any("unfinished <tool_call>" in record.getMessage() for record in caplog.records)


def test_parser_never_raises_on_garbage() -> None:
    pieces = [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<function=",
        "</function>",
        "<parameter=",
        "</parameter>",
        ">",
        "<",
        "\n",
        "x",
        "中",
        "f",
        "=",
        " ",
        "null",
        "{",
        "}",
    ]
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for phase in (REASONING, CONTENT):
            expected = parse_full(text, WEATHER_TOOLS, phase)
            _same(_feed_chunks(_random_chunks(text, rng), phase, WEATHER_TOOLS)[0], expected)
