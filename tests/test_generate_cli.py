"""The one-shot CLI, `python -m mlx_qwen36.generate`: stdout holds exactly the library's answer, reasoning and
statistics go to stderr, and bad input ends in one `error:` line and exit status 1."""

from __future__ import annotations

import importlib
import io
import json
import re
import subprocess
import sys

import pytest

import mlx_qwen36
from mlx_qwen36 import generator, load, load_model

cli = importlib.import_module("mlx_qwen36.generate")  # the module: `mlx_qwen36.generate` is the library function

GREEDY = ["--temp", "0", "--max-tokens", "8"]


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load(chat_dir)


@pytest.fixture(scope="module")
def short_context_dir(chat_dir, tmp_path_factory):
    """The tiny model with a 64-token context, so a too-long prompt is cheap to make."""
    out = tmp_path_factory.mktemp("short-context")
    for f in chat_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((chat_dir / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 64
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def vl(chat, vl_checkpoint):
    """A tiny vision-language model (weights only) with the text model's processor, and a picture."""
    folder, picture = vl_checkpoint
    return folder, (load_model(folder), chat[1]), picture


@pytest.fixture
def loaded(chat, chat_dir, short_context_dir, vl, monkeypatch):
    """main() finds the tiny models already loaded: reading the 33 MB tokenizer would dominate every run.
    Other paths (a missing folder) go to the real `load`."""
    real_load = cli.load

    def load_once(path, text_only=False, mtp=False, max_context=None):
        assert not mtp and max_context is None  # these runs ask for neither
        if path == str(chat_dir):
            return chat
        if path == str(short_context_dir):
            return load_model(path, text_only=text_only), chat[1]
        if path == str(vl[0]):
            assert not text_only  # an image was given: the vision tower is needed
            return vl[1]
        return real_load(path, text_only=text_only)

    monkeypatch.setattr(cli, "load", load_once)


def reference(chat, prompt="Hello", **kwargs) -> generator.GenerationResult:
    """What the library answers for the CLI's GREEDY settings."""
    model, processor = chat
    return generator.generate(model, processor, prompt, max_tokens=8, temperature=0, **kwargs)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def prompt_tokens(err: str) -> int:
    return int(re.search(r"^Prompt: (\d+) tokens", err, re.M).group(1))


def test_importing_the_cli_keeps_the_library_generate():
    # Python binds an imported submodule as an attribute of its package: unless mlx_qwen36/__init__.py guards
    # against it, importing this CLI turns `mlx_qwen36.generate` (and later `from mlx_qwen36 import generate`)
    # into the module, breaking every caller of the library function in the same process.
    assert mlx_qwen36.generate is generator.generate, "mlx_qwen36/__init__.py lets the CLI module shadow generate()"


def test_stdout_is_exactly_the_answer(chat, chat_dir, loaded, capsys):
    expected = reference(chat, enable_thinking=False)
    assert expected.content  # the tiny model says something, so the comparison means something
    code, out, err = run(capsys, "--model", str(chat_dir), "--prompt", "Hello", "--no-think", *GREEDY)
    assert code == 0
    assert out == expected.content + "\n"
    assert prompt_tokens(err) == expected.prompt_tokens
    for line in ("Generation: 8 tokens", "tokens-per-sec", "Peak memory:", "Finish reason: length"):
        assert line in err


def test_reasoning_goes_to_stderr_and_no_think_changes_the_prompt(chat, chat_dir, loaded, capsys):
    thinking = reference(chat)
    assert thinking.reasoning
    code, out, err = run(capsys, "--model", str(chat_dir), "-p", "Hello", *GREEDY)
    assert code == 0 and out == thinking.content + "\n"
    assert thinking.reasoning in err and prompt_tokens(err) == thinking.prompt_tokens
    _, _, no_think_err = run(capsys, "--model", str(chat_dir), "-p", "Hello", "--no-think", *GREEDY)
    assert prompt_tokens(no_think_err) == reference(chat, enable_thinking=False).prompt_tokens
    assert prompt_tokens(no_think_err) != thinking.prompt_tokens
    _, _, hidden = run(capsys, "--model", str(chat_dir), "-p", "Hello", "--hide-reasoning", *GREEDY)
    assert thinking.reasoning not in hidden and "Finish reason" in hidden


def test_system_prompt(chat, chat_dir, loaded, capsys):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}]
    expected = reference(chat, messages, enable_thinking=False)
    code, out, err = run(capsys, "--model", str(chat_dir), "-p", "Hello", "--system-prompt", "Be terse.",
                         "--no-think", *GREEDY)
    assert code == 0 and out == expected.content + "\n" and prompt_tokens(err) == expected.prompt_tokens


@pytest.mark.parametrize("quiet", [["--quiet"], ["--verbose", "False"]])
def test_prompt_from_stdin_and_quiet(chat, chat_dir, loaded, capsys, monkeypatch, quiet):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))  # echo's newline is not part of the message
    code, out, err = run(capsys, "--model", str(chat_dir), "--prompt", "-", "--no-think", *quiet, *GREEDY)
    assert (code, out, err) == (0, reference(chat, enable_thinking=False).content + "\n", "")


def test_ctrl_c_ends_the_answer_and_exits_130(chat_dir, loaded, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        for i, chunk in enumerate(generator.stream_generate(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(cli, "stream_generate", interrupted)
    code, out, err = run(capsys, "--model", str(chat_dir), "-p", "Hello", "--no-think", *GREEDY)
    assert code == 130 and out.endswith("\n") and out.count("\n") == 1
    assert "Generation: 3 tokens" in err and "Finish reason: interrupted" in err and "Traceback" not in err


def test_image_with_a_system_prompt(vl, loaded, capsys):
    folder, (model, processor), picture = vl
    conversation = [{"role": "system", "content": "Be terse."},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(picture)}},
                                                 {"type": "text", "text": "Describe it"}]}]
    expected = generator.generate(model, processor, conversation, max_tokens=8, temperature=0, enable_thinking=False)
    code, out, err = run(capsys, "--model", str(folder), "-p", "Describe it", "--system", "Be terse.",
                         "--image", str(picture), "--no-think", *GREEDY)
    assert code == 0 and out == expected.content + "\n" and prompt_tokens(err) == expected.prompt_tokens


def test_errors(chat_dir, short_context_dir, loaded, vl, tmp_path, capsys):
    picture = vl[2]
    missing = tmp_path / "no-such-model"
    cases = [
        (["--model", str(missing), "-p", "Hi"], str(missing)),
        (["--model", str(chat_dir), "-p", "Hi", "--image", str(tmp_path / "dog.png")], "dog.png: no such file"),
        (["--model", str(chat_dir), "-p", "Hi", "--system", "S", "--image", str(picture)], "without its vision tower"),
        (["--model", str(short_context_dir), "-p", "Hello " * 100], "context is 64 tokens"),
        (["--model", str(chat_dir), "-p", "  "], "the prompt is empty"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv, *GREEDY)
        assert (code, out) == (1, ""), argv
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_module_entry_point(chat, chat_dir, tmp_path):
    """`python -m mlx_qwen36.generate` from an unrelated folder; `> answer.txt` would get just the answer."""
    cmd = [sys.executable, "-m", "mlx_qwen36.generate", "--model", str(chat_dir), "-p", "Hello", "--no-think",
           *GREEDY]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference(chat, enable_thinking=False).content + "\n"
    assert "Finish reason: length" in done.stderr


def test_closed_stdout_exits_quietly(chat_dir, tmp_path):
    """`... | head -c 10`: the reader going away ends the run with status 1 and no traceback."""
    cmd = [sys.executable, "-m", "mlx_qwen36.generate", "--model", str(chat_dir), "-p", "Hello", "--no-think",
           *GREEDY]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the model has loaded: its first write finds no reader
    err = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 1 and "Traceback" not in err and "Broken pipe" not in err, err
