"""The examples run end to end: both scripts as subprocesses and the quickstart notebook through a Jupyter kernel,
all against a tiny random model with the real tokenizer (its text is gibberish, so nothing checks content). The
tool loop of examples/stream_tools.py is driven in-process by a model scripted to call a tool."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scripted import Scripted

from mlx_qwen36 import load
from mlx_qwen36.tool_parser import ToolCall

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def model_env(chat_dir, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("MLX_QWEN36_MODEL", str(chat_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return dict(os.environ)


def run_script(name: str, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def stream_tools():
    """examples/stream_tools.py imported as a module."""
    spec = importlib.util.spec_from_file_location("example_stream_tools", EXAMPLES / "stream_tools.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_generate_script(model_env):
    out = run_script("generate.py", "--max-tokens", "8", "Say hi.", env=model_env)
    assert "=== reasoning ===" in out and "=== answer ===" in out
    assert re.search(r"prompt: \d+ tokens at [\d.]+ tok/s \| generated: 8 tokens at [\d.]+ tok/s \| "
                     r"finish: length \| peak memory: [\d.]+ GB", out), out


def test_generate_script_with_mtp(mtp_chat_dir, monkeypatch):
    monkeypatch.setenv("MLX_QWEN36_MODEL", str(mtp_chat_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = dict(os.environ)
    plain = run_script("generate.py", "--max-tokens", "8", "--temperature", "0", "Say hi.", env=env)
    out = run_script("generate.py", "--max-tokens", "8", "--temperature", "0", "--mtp", "2", "Say hi.", env=env)
    assert out.split("=== stats ===")[0] == plain.split("=== stats ===")[0]  # the same reasoning and answer
    assert re.search(r"^MTP: [\d.]+ tokens per forward, acceptance by position [\d. ]+$", out, re.M), out


def test_stream_tools_script(model_env):
    out = run_script("stream_tools.py", "--max-tokens", "8", "--max-rounds", "2", env=model_env)
    assert "[thinking]" in out
    assert re.search(r"\[round 1\] prompt: \d+ tokens \(0 cached\) \| generated: \d+ tokens", out), out
    assert re.search(r"^done: [12] round\(s\), \d+ tool call\(s\)$", out, re.M), out


def test_run_tool_dispatch(stream_tools):
    weather = json.loads(stream_tools.run_tool(ToolCall("get_weather", {"city": "Paris"})))
    assert weather == {"city": "Paris", "temperature": 18, "unit": "celsius", "conditions": "light rain"}
    assert json.loads(stream_tools.run_tool(ToolCall("get_weather", {"city": "Tokyo", "unit": "fahrenheit"}))
                      )["temperature"] == 75.2
    assert json.loads(stream_tools.run_tool(ToolCall("add", {"a": 2, "b": 3.5}))) == 5.5
    assert "unknown tool 'nope'" in json.loads(stream_tools.run_tool(ToolCall("nope", {})))["error"]
    assert "TypeError" in json.loads(stream_tools.run_tool(ToolCall("add", {"a": 1})))["error"]
    names = {t["function"]["name"] for t in stream_tools.TOOLS}
    assert names == set(stream_tools.FUNCTIONS)


def test_tool_loop_runs_tools_and_reuses_cache(stream_tools, chat_dir):
    model, processor = load(chat_dir)
    end = processor.token_id("<|im_end|>")
    call = ("Need the weather.</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
            "</parameter>\n</function>\n</tool_call>")
    script = processor.encode(call) + [end] + processor.encode("Got it.</think>\n\nIt is 18 °C in Paris.") + [end]
    out = io.StringIO()
    messages = stream_tools.chat_with_tools(Scripted(model, script), processor, "Weather in Paris?", max_rounds=3,
                                            printer=stream_tools.Printer(out), max_tokens=64, temperature=0)
    text = out.getvalue()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    first, tool, last = messages[1], messages[2], messages[3]
    assert first["reasoning_content"] == "Need the weather." and first["content"] == ""
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert tool["tool_call_id"] == first["tool_calls"][0]["id"]
    assert json.loads(tool["content"])["temperature"] == 18
    assert last["content"] == "It is 18 °C in Paris." and "tool_calls" not in last
    assert "| Need the weather." in text and '-> get_weather({"city": "Paris"})' in text
    assert "finish: tool_calls" in text and "<- get_weather:" in text
    cached = [int(n) for n in re.findall(r"\((\d+) cached\)", text)]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] > 0, text


def test_quickstart_notebook(model_env):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "commit the notebook cleared"
    limits = [int(n) for c in code for n in re.findall(r"(?:max_tokens=|MAX_TOKENS = )(\d+)", c.source)]
    assert limits and max(limits) <= 16, "keep the notebook quick to run"
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "finish:" in printed and "cached:" in printed
