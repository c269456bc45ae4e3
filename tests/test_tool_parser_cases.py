"""Qwen3-Coder tool-call cases from the peers' own test suites, restated for our parser.

Sources: vLLM (tests/tool_parsers/test_qwen3coder_tool_parser.py, test_qwen3_xml_coder_shared.py), SGLang
(test/registered/unit/function_call/test_qwen3_coder_detector.py, test_qwen3_coder_numeric_precision.py), mlx-lm
(tests/test_tool_parsing.py) and llama.cpp (tests/test-chat.cpp, the Qwen3-Coder block). Each case names its suite.
Where we decide otherwise than a peer, the test says so and the tool_parser module docstring says why.

Every streamed case is also fed in the peer's own chunking, one character at a time and cut at every position,
and must equal the whole parse.
"""

from __future__ import annotations

import json
import logging
import time

import pytest

from mlx_qwen36.tool_parser import (
    CONTENT,
    REASONING,
    TOOL_CALL,
    ParsedOutput,
    StreamParser,
    ToolCallParseError,
    convert_param_value,
    parse_full,
    parse_tool_call,
)


def _tool(name: str, properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties}}}


WEATHER = _tool(
    "get_current_weather",
    {"city": {"type": "string"}, "state": {"type": "string"}, "unit": {"type": "string", "enum": ["f", "c"]}},
)
AREA = _tool(
    "calculate_area", {"shape": {"type": "string"}, "dimensions": {"type": "object"}, "precision": {"type": "integer"}}
)
WRITE_FILE = _tool("write_file", {"path": {"type": "string"}, "content": {"type": "string"}})
SGLANG_WEATHER = _tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}})


def _stream(chunks: list[str], tools: list[dict], phase: str = CONTENT) -> ParsedOutput:
    parser = StreamParser(phase, tools)
    out = ParsedOutput()
    for event in [event for chunk in chunks for event in parser.feed(chunk)] + parser.finish():
        if event.phase == TOOL_CALL:
            out.tool_calls.append(event.tool_call)
        elif event.phase == REASONING:
            out.reasoning += event.text
        else:
            out.content += event.text
    return out


def _summary(out: ParsedOutput) -> tuple:
    return out.reasoning, out.content, [(call.name, call.arguments) for call in out.tool_calls]


def _parse(text: str, tools: list[dict], chunks: list[str] | None = None) -> ParsedOutput:
    """parse_full, checked against the peer's chunking, every single cut and one character at a time."""
    whole = parse_full(text, tools)
    splits = [list(text)] + [[text[:cut], text[cut:]] for cut in range(len(text) + 1)]
    if chunks is not None:
        assert "".join(chunks) == text
        splits.append(chunks)
    for split in splits:
        assert _summary(_stream(split, tools)) == _summary(whole), split
    return whole


def _arguments(text: str, tools: list[dict], chunks: list[str] | None = None) -> list[dict]:
    return [call.arguments for call in _parse(text, tools, chunks).tool_calls]


# --------------------------------------------------------------------------------------------------------
# (a) exact integers
# --------------------------------------------------------------------------------------------------------


def _lookup_call(raw: str) -> str:
    return f"<tool_call><function=lookup><parameter=value>{raw}</parameter></function></tool_call>"


@pytest.mark.parametrize(
    ("schema", "raw", "expected"),
    [
        # SGLang test_qwen3_coder_numeric_precision: large integer literals under a number schema stay exact.
        ({"type": "number"}, "9007199254740993", 9007199254740993),
        ({"type": "number"}, "-9007199254740993", -9007199254740993),
        ({"type": "number"}, "18446744073709551615", 18446744073709551615),
        ({"type": "number"}, "1790892345000000001", 1790892345000000001),
        ({"type": "number"}, " 9007199254740993 ", 9007199254740993),
        # SGLang: the same through a nullable number.
        ({"anyOf": [{"type": "number"}, {"type": "null"}]}, "9007199254740993", 9007199254740993),
        # SGLang: other numeric forms; a decimal literal is a float even when integral.
        ({"type": "number"}, "42", 42),
        ({"type": "number"}, "-12.5", -12.5),
        ({"type": "number"}, "1.25e3", 1250.0),
        ({"type": "number"}, "not-a-number", "not-a-number"),
        ({"type": "number"}, "null", None),
        # SGLang: integer and string schemas.
        ({"type": "integer"}, "9007199254740993", 9007199254740993),
        ({"type": "string"}, "9007199254740993", "9007199254740993"),
        # mlx-lm test_parsers: "number" parameters with integral values come back as ints.
        ({"type": "number"}, "48838483920", 48838483920),
        # Ours: nanosecond timestamps as integers, and integral decimals under integer types.
        ({"type": "integer"}, "1790892345123456789", 1790892345123456789),
        ({"type": "int64"}, "1e3", 1000),
        ({"type": "integer"}, "9007199254740993.0", 9007199254740993),
        ({"type": "integer"}, "1.5", "1.5"),
        ({"type": "integer"}, "1_000", "1_000"),  # Python's int() accepts it, JSON does not
        ({"type": "number"}, "1e400", "1e400"),  # a float overflow is not a JSON number
        ({"type": "integer"}, "9" * 5000, "9" * 5000),  # json.dumps refuses ints this long
    ],
    ids=lambda value: repr(value)[:40],
)
def test_numbers_keep_their_precision(schema: dict, raw: str, expected) -> None:
    tools = [_tool("lookup", {"value": schema})]
    for chunks in (
        [_lookup_call(raw)],
        list(_lookup_call(raw)),
        [_lookup_call(raw)[i : i + 11] for i in range(0, len(_lookup_call(raw)), 11)],
    ):
        out = _stream(chunks, tools)
        assert out.content == ""
        [call] = out.tool_calls
        assert call.arguments == {"value": expected}
        assert type(call.arguments["value"]) is type(expected)
        assert json.loads(call.arguments_json()) == {"value": expected}


# --------------------------------------------------------------------------------------------------------
# (b) a missing </parameter>
# --------------------------------------------------------------------------------------------------------

# vLLM test_extract_tool_calls_missing_closing_parameter_tag (and its streaming twin).
MISSING_CLOSE = (
    "Let me check the weather for you:\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n"
    "<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nf\n</parameter>\n</function>\n</tool_call>"
)


def test_missing_parameter_end_stops_at_the_next_parameter() -> None:
    # vLLM: the value ends at the line-start <parameter=state>, in the whole parse and streamed token-like.
    out = _parse(MISSING_CLOSE, [WEATHER], [MISSING_CLOSE[i : i + 3] for i in range(0, len(MISSING_CLOSE), 3)])
    assert out.content == "Let me check the weather for you:\n"
    assert [call.arguments for call in out.tool_calls] == [{"city": "Dallas", "state": "TX", "unit": "f"}]


def _sglang_call(city_block: str) -> str:
    return (
        "<tool_call>\n<function=get_weather>\n"
        f"<parameter=city>\n{city_block}\n"
        "<parameter=days>\n3\n</parameter>\n"
        "</function>\n</tool_call>"
    )


def test_missing_parameter_end_sglang_cases() -> None:
    # SGLang test_qwen3_coder_detector: well-formed value, angle brackets kept, values ending like a marker kept.
    assert _arguments(_sglang_call("Shanghai\n</parameter>"), [SGLANG_WEATHER]) == [{"city": "Shanghai", "days": 3}]
    assert (
        _arguments(_sglang_call("a <b>tag</b> city\n</parameter>"), [SGLANG_WEATHER])[0]["city"] == "a <b>tag</b> city"
    )
    for value in ("<config>\n  <p>1</p>\n</parameters>", "x </parameterList>"):
        assert _arguments(_sglang_call(f"{value}\n</parameter>"), [SGLANG_WEATHER])[0]["city"] == value
    # SGLang's unclosed city: it ends at <parameter=days> (missing </parameter>).
    assert _arguments(_sglang_call("Shanghai"), [SGLANG_WEATHER]) == [{"city": "Shanghai", "days": 3}]


def test_drifted_end_marker_is_kept_verbatim() -> None:
    # SGLang strips drifted markers ("</parameter1>") from the value; we chose otherwise: values stay as written.
    assert _arguments(_sglang_call("Shanghai\n</parameter1>"), [SGLANG_WEATHER]) == [
        {"city": "Shanghai\n</parameter1>", "days": 3}
    ]


def test_long_unclosed_value_is_linear() -> None:
    # SGLang test_long_whitespace_run_in_unclosed_value_parses_in_linear_time, whole and streamed in 3-char chunks.
    value = "a" + " " * 100_000 + "b"
    text = _sglang_call(value)
    start = time.perf_counter()
    assert [call.arguments for call in parse_full(text, [SGLANG_WEATHER]).tool_calls] == [{"city": value, "days": 3}]
    streamed = _stream([text[i : i + 3] for i in range(0, len(text), 3)], [SGLANG_WEATHER])
    assert [call.arguments for call in streamed.tool_calls] == [{"city": value, "days": 3}]
    assert time.perf_counter() - start < 10.0


def test_long_value_with_tags_streams_in_linear_time() -> None:
    # Ours: a 400 kB file full of tag text, fed 4 characters at a time, costs linear time.
    content = "<b>x</b> </parameter> y\n" * 16_000
    text = (
        "<tool_call>\n<function=write_file>\n<parameter=content>\n"
        + content
        + "\n</parameter>\n</function>\n</tool_call>"
    )
    start = time.perf_counter()
    out = _stream([text[i : i + 4] for i in range(0, len(text), 4)], [WRITE_FILE])
    assert [call.arguments for call in out.tool_calls] == [{"content": content}]
    assert time.perf_counter() - start < 20.0


def test_missing_parameter_end_before_function_end() -> None:
    # vLLM (its regex also ends a value at </function>); ours: only in a value holding no tag text of its own.
    text = "<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\n2\n</function>\n</tool_call>\nok"
    out = _parse(text, [])
    assert [call.arguments for call in out.tool_calls] == [{"a": "1", "b": "2"}]
    assert out.content == "ok"


def test_missing_parameter_end_and_an_undeclared_parameter() -> None:
    # vLLM (an undeclared name is an extra argument); ours: found when the turn ends and the call is read again.
    text = (
        "<tool_call>\n<function=write_file>\n<parameter=path>\na\n<parameter=mode>\n1\n</parameter>\n</function>\n"
        "</tool_call>\nWritten."
    )
    parser = StreamParser(CONTENT, [WRITE_FILE])
    assert parser.feed(text) == []  # the first reading sees a quoted <parameter=mode> block: the call stays open
    out = _parse(text, [WRITE_FILE])
    assert [call.arguments for call in out.tool_calls] == [{"path": "a", "mode": "1"}]
    assert out.content == "Written."


# --------------------------------------------------------------------------------------------------------
# (c) tag text inside string values
# --------------------------------------------------------------------------------------------------------


def _write_file(content: str, path: str = "test.py") -> str:
    return (
        "<tool_call>\n<function=write_file>\n"
        f"<parameter=path>\n{path}\n</parameter>\n"
        f"<parameter=content>\n{content}</parameter>\n"
        "</function>\n</tool_call>"
    )


# vLLM test_content_with_xml_structural_tags: quoted tags inside code.
XML_TAGS_IN_CONTENT = (
    'char_deltas = [\n    "<tool_call>\\n",\n    "<parameter=query>\\n",\n    "\\n</parameter>\\n",\n'
    '    "</function>\\n",\n]\n'
)
# vLLM test_content_with_param_like_lines: </parameter> and <parameter=NAME> on their own lines, NAME undeclared.
PARAM_LIKE_LINES = (
    'TOOL_CALL_TEMPLATE = """\n</parameter>\n<parameter=new_string>\n#!/usr/bin/env python3\n</parameter>\n"""\n'
)
# vLLM test_content_with_real_param_name_literal: a quoted <parameter=path> block, path being a real parameter.
REAL_NAME_LITERAL = 'doc = """\n<parameter=path>\nliteral/value\n</parameter>\n"""\n'
# vLLM test_content_with_full_nested_tool_call: a whole quoted call to the same tool.
FULL_NESTED_CALL = (
    'doc = """\n<tool_call>\n<function=write_file>\n<parameter=path>\nliteral/value.txt\n</parameter>\n'
    '<parameter=content>\nhello\n</parameter>\n</function>\n</tool_call>\n"""\n'
)


@pytest.mark.parametrize(
    ("content", "chunks"),
    [
        (XML_TAGS_IN_CONTENT, None),
        (
            PARAM_LIKE_LINES,
            # vLLM's streaming deltas: each literal line alone, the first </parameter> with nothing after it yet.
            [
                "<tool_call>\n",
                "<function=write_file>\n",
                "<parameter=path>\ntest.py\n</parameter>\n",
                '<parameter=content>\nTOOL_CALL_TEMPLATE = """\n',
                "</parameter>\n",
                "<parameter=new_string>\n",
                "#!/usr/bin/env python3\n",
                "</parameter>\n",
                '"""\n',
                "</parameter>\n",
                "</function>\n",
                "</tool_call>",
            ],
        ),
        (REAL_NAME_LITERAL, None),
        (FULL_NESTED_CALL, None),
    ],
    ids=["xml_structural_tags", "param_like_lines", "real_param_name_literal", "full_nested_tool_call"],
)
def test_tag_text_inside_a_value(content: str, chunks: list[str] | None) -> None:
    # vLLM test_qwen3_xml_coder_shared: the value is kept intact and no parameter or call is invented.
    out = _parse(_write_file(content), [WRITE_FILE], chunks)
    assert out.content == ""
    assert [call.arguments for call in out.tool_calls] == [{"path": "test.py", "content": content.rstrip("\n")}]
    assert list(out.tool_calls[0].arguments) == ["path", "content"]


def test_two_calls_second_quotes_an_out_of_schema_call() -> None:
    # vLLM test_two_tools_second_with_out_of_schema_nested_literal (its streaming deltas too).
    nested = (
        'template = """\n<tool_call>\n<function=foo>\n<parameter=bar>baz</parameter>\n</function>\n</tool_call>\n"""\n'
    )
    first = "<tool_call>\n<function=foo>\n<parameter=bar>baz</parameter>\n</function>\n</tool_call>"
    text = first + "\n\n" + _write_file(nested, path="fixture.py")
    chunks = [
        "<tool_call>\n<function=foo>\n",
        "<parameter=bar>baz</parameter>\n",
        "</function>\n</tool_call>",
        "\n\n",
        "<tool_call>\n<function=write_file>\n",
        "<parameter=path>\nfixture.py\n</parameter>\n",
        '<parameter=content>\ntemplate = """\n',
        "<tool_call>\n<function=foo>\n",
        "<parameter=bar>baz</parameter>\n",
        "</function>\n</tool_call>\n",
        '"""\n',
        "</parameter>\n",
        "</function>\n",
        "</tool_call>",
    ]
    out = _parse(text, [WRITE_FILE], chunks)
    assert [(call.name, call.arguments) for call in out.tool_calls] == [
        ("foo", {"bar": "baz"}),
        ("write_file", {"path": "fixture.py", "content": nested.rstrip("\n")}),
    ]
    assert out.content == ""


def test_literal_tool_call_end_does_not_end_the_call_early() -> None:
    # Ours (the streaming half of class c): no call is emitted until the structural end, and nothing leaks.
    parser = StreamParser(CONTENT, [WRITE_FILE])
    text = _write_file("print('</tool_call>')\n</function>\n</tool_call>\nmore\n")
    cut = text.index("more")
    assert parser.feed(text[:cut]) == []
    assert parser.phase == TOOL_CALL
    [event] = parser.feed(text[cut:])
    assert event.tool_call.arguments["content"] == "print('</tool_call>')\n</function>\n</tool_call>\nmore"
    assert parser.finish() == []


@pytest.mark.parametrize(
    "content",
    [
        "x\n</parameter>\n<parameter=path>\n/etc/passwd\n",  # a quoted, unbalanced <parameter=path> in the content
        "x\n</parameter>\n<parameter=path>\n/etc/passwd\n</parameter>\n<parameter=path>\ny\n",  # a repeat
    ],
)
def test_repeated_parameter_fails_the_call(content: str, caplog: pytest.LogCaptureFixture) -> None:
    # vLLM, SGLang and mlx-lm let the last copy overwrite the first; we chose otherwise: the call fails and passes
    # through as content, since the "real" path could be quoted text. The next call still parses.
    second = "\n<tool_call>\n<function=write_file>\n<parameter=path>\nb\n</parameter>\n</function>\n</tool_call>"
    text = _write_file(content) + second + "\nok"
    with caplog.at_level(logging.WARNING, logger="mlx_qwen36.tool_parser"):
        out = _parse(text, [WRITE_FILE])
    assert [call.arguments for call in out.tool_calls] == [{"path": "b"}]
    assert out.content == _write_file(content) + "\nok"
    assert any("given twice" in record.getMessage() for record in caplog.records)
    with pytest.raises(ToolCallParseError, match="given twice"):
        parse_tool_call(_write_file(content), [WRITE_FILE])


def test_undeclared_parameter_after_the_first() -> None:
    # vLLM (extra argument, though its in-value filter is the one param_like_lines needs); an unknown tool takes
    # any name at once, a known one when the turn ends (see test_missing_parameter_end_and_an_undeclared_parameter).
    text = (
        "<tool_call>\n<function=write_file>\n<parameter=path>\na\n</parameter>\n<parameter=mode>\n1\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert _arguments(text, [WRITE_FILE]) == [{"path": "a", "mode": "1"}]
    assert _arguments(text, []) == [{"path": "a", "mode": "1"}]
    assert parse_tool_call(text, [WRITE_FILE]).arguments == {"path": "a", "mode": "1"}


def test_jinja_phantom_call_is_not_a_call() -> None:
    # vLLM test_jinja_template_phantom_tool_call_is_rejected: "{{ tc.name }}" is not a function name.
    phantom = (
        "<tool_call>\n<function={{ tc.name }}>\n<parameter={{ k }}>\n{{ v }}\n</parameter>\n</function>\n</tool_call>"
    )
    text = phantom + "\n\n" + _write_file("hello\n", path="out.txt")
    out = _parse(text, [WRITE_FILE])
    assert [call.name for call in out.tool_calls] == ["write_file"]
    assert out.content == phantom + "\n\n"  # passed through as content, as every malformed call is


def test_inline_empty_tool_call_keeps_the_narrative() -> None:
    # vLLM test_inline_empty_tool_call_preserves_content_before_real_call.
    log = _tool("log", {"msg": {"type": "string"}})
    text = (
        "I'll show: <tool_call>example</tool_call>. Now real:\n"
        "<tool_call>\n<function=log>\n<parameter=msg>\nhi\n</parameter>\n</function>\n</tool_call>"
    )
    out = _parse(text, [log])
    assert [call.arguments for call in out.tool_calls] == [{"msg": "hi"}]
    assert "I'll show:" in out.content and "Now real:" in out.content


def test_missing_tool_call_end_does_not_hold_the_answer_back() -> None:
    # Ours: after </function>, text other than </tool_call> ends the call and streams on as content.
    parser = StreamParser(CONTENT, [WRITE_FILE])
    assert parser.feed("<tool_call>\n<function=write_file>\n<parameter=path>\na\n</parameter>\n</function>\n") == []
    events = parser.feed("The file is written")
    assert [event.phase for event in events] == [TOOL_CALL, CONTENT]
    assert events[1].text == "The file is written"


# --------------------------------------------------------------------------------------------------------
# (d) null
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "raw", "expected"),
    [
        # vLLM test_string_null_value_preserved: a plain string keeps "null".
        ({"type": "string"}, "null", "null"),
        # vLLM test_python_none_value_for_nullable_int: Python's None for a nullable integer.
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "None", None),
        # vLLM test_anyof_string_null_with_null_literal_returns_none.
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "null", None),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "None", None),
        # vLLM test_anyof_string_null_keeps_value_as_string / test_anyof_integer_null_parses_as_int.
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "42", "42"),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "42", 42),
        # llama.cpp test-chat: nullable string and integer as type lists.
        ({"type": ["string", "null"]}, "hello world", "hello world"),
        ({"type": ["null", "string"]}, "hello world", "hello world"),
        ({"type": ["integer", "null"]}, "42", 42),
        # Ours: None for non-string types and OpenAPI's nullable; a plain string keeps "None" too.
        ({"type": "integer"}, "None", None),
        ({"type": "boolean"}, "None", None),
        ({"type": "string", "nullable": True}, "None", None),
        ({"type": "string"}, "None", "None"),
        ({"type": ["string", "null"]}, "null", None),
    ],
)
def test_null_values(schema: dict, raw: str, expected) -> None:
    assert convert_param_value(raw, schema) == expected
    assert type(convert_param_value(raw, schema)) is type(expected)
    call = parse_tool_call(
        f"<tool_call>\n<function=f>\n<parameter=v>\n{raw}\n</parameter>\n</function>\n</tool_call>",
        [_tool("f", {"v": schema})],
    )
    assert call.arguments == {"v": expected}


# --------------------------------------------------------------------------------------------------------
# (e) unions and JSON literals
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "raw", "expected"),
    [
        # vLLM test_anyof_object_param_not_double_encoded.
        (
            {"anyOf": [{"type": "object"}, {"type": "null"}]},
            '{"key": "value", "count": 42}',
            {"key": "value", "count": 42},
        ),
        # vLLM test_double_encoded_object_param: a JSON string holding a Python dict.
        ({"type": "object"}, "\"{'key': 'value', 'n': 1}\"", {"key": "value", "n": 1}),
        # vLLM test_array_with_json_bool (and qwen36_bugs): JSON literals inside an array.
        ({"type": "array"}, '["a", "b", 1, true]', ["a", "b", 1, True]),
        # vLLM test_extract_tool_calls_complex_type_with_single_quote; mlx-lm test_qwen3_coder_single_quoted_params.
        ({"type": "object"}, "{'key': 'value'}", {"key": "value"}),
        ({"type": "object"}, "{'category': 'books', 'in_stock': True}", {"category": "books", "in_stock": True}),
        ({"type": "array"}, "['fiction', 'new']", ["fiction", "new"]),
        # llama.cpp test-chat: an array of objects with JSON booleans; an enum without a type stays a string.
        (
            {"type": "array", "items": {"type": "object"}},
            '[{"item": "Check stuff", "selected": false}, {"item": "Prepare stuff", "selected": true}]',
            [{"item": "Check stuff", "selected": False}, {"item": "Prepare stuff", "selected": True}],
        ),
        ({"enum": ["celsius", "fahrenheit"]}, "celsius", "celsius"),
        # Ours: Python quotes mixed with JSON literals; raw newlines inside JSON strings.
        ({"type": "object"}, "{'debug': true, 'level': null}", {"debug": True, "level": None}),
        ({"type": "array"}, "[1, 'two', false]", [1, "two", False]),
        ({"type": "object"}, '{"code": "line 1\nline 2"}', {"code": "line 1\nline 2"}),
        # Ours: nested anyOf, oneOf of objects and arrays, type lists, enum and const types.
        ({"anyOf": [{"anyOf": [{"type": "integer"}]}, {"type": "null"}]}, "7", 7),
        ({"oneOf": [{"type": "object", "properties": {"a": {}}}, {"type": "array", "items": {}}]}, "[1]", [1]),
        ({"oneOf": [{"properties": {"a": {"type": "integer"}}}, {"type": "string"}]}, '{"a": 1}', {"a": 1}),
        ({"oneOf": [{"properties": {"a": {"type": "integer"}}}, {"type": "string"}]}, "plain", "plain"),
        ({"type": ["integer", "string"]}, "42", 42),
        ({"type": ["integer", "string"]}, "forty-two", "forty-two"),
        ({"type": ["string", "integer"]}, "42", "42"),
        ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", True),
        ({"anyOf": [{"type": "object"}, {"type": "string"}]}, "42", "42"),
        ({"allOf": [{"type": "number"}]}, "2.5", 2.5),
        ({"enum": [1, 2, 3]}, "2", 2),
        ({"const": True}, "true", True),
        ({"anyOf": [{"$ref": "#/$defs/Thing"}]}, '{"x": 1}', {"x": 1}),  # an unresolved $ref: untyped
    ],
)
def test_unions_and_json_literals(schema: dict, raw: str, expected) -> None:
    assert convert_param_value(raw, schema) == expected
    assert type(convert_param_value(raw, schema)) is type(expected)


# --------------------------------------------------------------------------------------------------------
# Regressions the peers' suites agree on (these passed before too)
# --------------------------------------------------------------------------------------------------------


def test_vllm_extract_cases() -> None:
    # vLLM test_extract_tool_calls: content before a call, a multiline JSON object, parallel calls.
    text = (
        "Sure! Let me check.<tool_call>\n<function=calculate_area>\n<parameter=shape>\nrectangle\n</parameter>\n"
        '<parameter=dimensions>\n{"width": 10,\n "height": 20}\n</parameter>\n<parameter=precision>\n2\n</parameter>\n'
        "</function>\n</tool_call>\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nOrlando\n"
        "</parameter>\n<parameter=state>\nFL\n</parameter>\n</function>\n</tool_call>"
    )
    out = _parse(text, [WEATHER, AREA])
    assert out.content == "Sure! Let me check."
    assert [call.arguments for call in out.tool_calls] == [
        {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2},
        {"city": "Orlando", "state": "FL"},
    ]


def test_vllm_streaming_deltas() -> None:
    # vLLM: two calls and trailing text in one delta; several parameters in one delta; </tool_call> with text.
    weather = _tool("get_weather", {"city": {"type": "string"}})
    two = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nLondon\n</parameter>\n</function>\n</tool_call>"
    )
    out = _stream([two + "\nAll done!"], [weather])
    assert [call.arguments for call in out.tool_calls] == [{"city": "Paris"}, {"city": "London"}]
    assert out.content == "All done!"
    deltas = ["<tool_call>", "\n<function=get_weather>", "\n<parameter=city>Paris</parameter>", "\n</function>"]
    out = _stream(deltas + ["\n</tool_call>\nI hope this helps!"], [weather])
    assert [call.arguments for call in out.tool_calls] == [{"city": "Paris"}]
    assert out.content == "I hope this helps!"


def test_vllm_no_double_serialisation_and_fallback_without_tags() -> None:
    # vLLM test_no_double_serialization_string_args and test_extract_tool_calls_fallback_no_tags.
    greet = _tool("greet", {"message": {"type": "string"}})
    call = parse_tool_call(
        "<tool_call>\n<function=greet>\n<parameter=message>hello world</parameter>\n</function>\n</tool_call>", [greet]
    )
    assert call.arguments_json() == '{"message": "hello world"}'
    bare = "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>"
    assert parse_tool_call(bare, [WEATHER]).arguments == {"city": "Dallas"}
    # vLLM's streaming also takes a bare <function=…> in content as a call; we chose otherwise (module docstring).
    out = _parse("I'll check.\n\n" + bare + "\n</tool_call>", [WEATHER])
    assert out.tool_calls == [] and bare in out.content


def test_vllm_malformed_function_tag_does_not_crash() -> None:
    # vLLM test_malformed_xml_no_gt_delimiter / test_none_tool_calls_filtered.
    text = (
        "<tool_call>\n<function=bad_func_no_gt\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>Dallas</parameter>\n"
        "<parameter=state>TX</parameter>\n</function>\n</tool_call>"
    )
    out = _parse(text, [WEATHER])
    assert [call.arguments for call in out.tool_calls] == [{"city": "Dallas", "state": "TX"}]
    with pytest.raises(ToolCallParseError):
        parse_tool_call("<tool_call>\n<function=get_current_weather\n<parameter=city>Dallas</parameter>\n</function>")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # llama.cpp test-chat: multiline code, CJK, HTML markup.
        ('def hello():\n    print("Hello, world!")\n\nhello()', 'def hello():\n    print("Hello, world!")\n\nhello()'),
        ("格", "格"),
        (
            "<html>\n <head>\n  <title>Hello!</title>\n </head>\n</html>",
            "<html>\n <head>\n  <title>Hello!</title>\n </head>\n</html>",
        ),
        # mlx-lm test_qwen3_coder_iso_date / test_qwen3_coder_partial_number: strings that look like other things.
        ("2025-06-15T10:30:00Z", "2025-06-15T10:30:00Z"),
        ("version 3.10.5-beta", "version 3.10.5-beta"),
    ],
)
def test_string_values_verbatim(code: str, expected: str) -> None:
    python = _tool("python", {"code": {"type": "string"}})
    text = f"<tool_call>\n<function=python>\n<parameter=code>\n{code}\n</parameter>\n</function>\n</tool_call>"
    assert _arguments(text, [python]) == [{"code": expected}]


def test_llama_cpp_optional_arguments_in_any_order() -> None:
    # llama.cpp test-chat: two required and five optional arguments, shuffled.
    names = ["req1", "req2", "opt1", "opt2", "opt3", "opt4", "opt5"]
    tool = _tool(
        "tool_2req_5opt",
        {name: {"type": "integer" if name in ("req2", "opt4", "opt2") else "string"} for name in names},
    )
    order = [
        ("req1", "test"),
        ("req2", "99"),
        ("opt3", "c"),
        ("opt1", "a"),
        ("opt5", "e"),
        ("opt4", "4"),
        ("opt2", "2"),
    ]
    body = "".join(f"<parameter={name}>\n{value}\n</parameter>\n" for name, value in order)
    text = f"<tool_call>\n<function=tool_2req_5opt>\n{body}</function>\n</tool_call>"
    [arguments] = _arguments(text, [tool])
    assert arguments == {"req1": "test", "req2": 99, "opt3": "c", "opt1": "a", "opt5": "e", "opt4": 4, "opt2": 2}
    assert list(arguments) == [name for name, _ in order]
