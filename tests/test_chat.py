"""The chat CLI: commands and conversation state in-process, and a real terminal session driven through tmux."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time

import pytest

from mlx_qwen36 import load
from mlx_qwen36.chat import Session


@pytest.fixture
def session(chat_dir) -> Session:
    model, processor = load(chat_dir)
    return Session(model, processor, {"temperature": 0}, max_tokens=6, out=io.StringIO())


def test_turns_build_the_conversation_and_reuse_the_cache(session):
    session.ask("Hello")
    session.ask("And again")
    roles = [m["role"] for m in session.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert session.last.cached_tokens > 0
    assert "prompt tokens" in session.out.getvalue()


def test_commands(session, tmp_path):
    assert session.command("/think off") and not session.think
    session.command("/system Be terse.")
    assert session.messages == [{"role": "system", "content": "Be terse."}]
    session.ask("Hi")
    session.command(f"/save {tmp_path / 'c.safetensors'}")
    tokens = list(session.cache.tokens)
    session.command("/reset")
    assert session.cache.tokens == [] and session.messages == [{"role": "system", "content": "Be terse."}]
    session.command(f"/load {tmp_path / 'c.safetensors'}")
    assert session.cache.tokens == tokens
    session.command("/load /does/not/exist.safetensors")
    session.command("/image cat.png")
    session.command("/bogus")
    out = session.out.getvalue()
    assert "error:" in out and "without its vision tower" in out and "unknown command" in out
    assert session.command("/quit") is False


def test_refused_message_is_not_kept(session):
    with pytest.raises(ValueError, match="context"):
        session.ask("word " * 300_000)
    assert session.messages == []


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def alive(name: str) -> bool:
    return subprocess.run(["tmux", "has-session", "-t", name], capture_output=True).returncode == 0


def screen(name: str) -> str:
    return tmux("capture-pane", "-t", name, "-p", "-S", "-200")


def wait_for(name: str, text: str, timeout: float = 60.0, count: int = 1) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = screen(name)
        if out.count(text) >= count:
            return out
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear {count}x on the screen:\n{screen(name)}")


def test_real_terminal_session(chat_dir):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    name = f"mlxq-{time.time_ns()}"
    cmd = f"{sys.executable} -m mlx_qwen36.chat --model {chat_dir} --max-tokens 4000 --temp 0"
    tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "50", cmd)
    try:
        wait_for(name, "ready in")
        tmux("send-keys", "-t", name, "/max-tokens", "Enter")
        wait_for(name, "unknown command")
        tmux("send-keys", "-t", name, "first line\\", "Enter", "second line", "Enter")
        wait_for(name, "... second line")
        time.sleep(1.5)
        tmux("send-keys", "-t", name, "C-c")  # a long answer is stopped and the prompt comes back
        wait_for(name, "[interrupted]")
        wait_for(name, ">>>", count=3)  # the prompt is back (capture-pane drops its trailing space)
        tmux("send-keys", "-t", name, "/think off", "Enter")
        wait_for(name, "thinking off")
        tmux("send-keys", "-t", name, "/stats", "Enter")
        wait_for(name, "interrupted]")
        tmux("send-keys", "-t", name, "/help", "Enter")
        wait_for(name, "/reasoning show|hide")
        tmux("send-keys", "-t", name, "/quit", "Enter")
        deadline = time.time() + 20
        while alive(name) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(name), "the chat did not exit on /quit"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
