"""The chat CLI: commands and conversation state in-process, and a real terminal session driven through tmux."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time

import mlx.core as mx
import pytest

from mlx_qwen36 import load, load_model, make_prompt_cache, synthetic
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


def test_load_goes_on_with_the_saved_conversation(session, tmp_path):
    session.preserve_thinking = True  # past answers render as they were generated: all of the history is reusable
    session.command("/think off")
    session.ask("Hello")
    session.ask("And again")
    history = [dict(m) for m in session.messages]
    session.command(f"/save {tmp_path / 'chat.cache'}")
    session.ask("One more")
    continued = session.last.cached_tokens
    session.command("/reset")
    session.command("/think on")
    session.command(f"/load {tmp_path / 'chat.cache'}")
    assert session.messages == history and session.think is False
    session.ask("One more")
    history_ids = session.processor.apply_chat_template(history, enable_thinking=False, preserve_thinking=True,
                                                        add_generation_prompt=False)
    last_answer = max(i for i, t in enumerate(history_ids) if t == session.processor.token_id("<|im_start|>"))
    assert session.last.cached_tokens == continued > last_answer  # as if never left: into the last answer


def test_a_failed_load_keeps_the_conversation(session, tmp_path):
    session.ask("Hello")
    messages, cache = [dict(m) for m in session.messages], session.cache
    (tmp_path / "junk.cache").write_bytes(b"junk")
    session.command(f"/load {tmp_path / 'junk.cache'}")
    other = load_model(synthetic.write_checkpoint(tmp_path / "other", synthetic.text_config("tiny"), mx.float32))
    make_prompt_cache(other).save(tmp_path / "other.cache", conversation={"messages": [], "system": None,
                                                                          "think": True})
    session.command(f"/load {tmp_path / 'other.cache'}")
    session.cache.save(tmp_path / "damaged.cache", conversation={"messages": "not a list"})
    session.command(f"/load {tmp_path / 'damaged.cache'}")
    assert session.messages == messages and session.cache is cache
    out = session.out.getvalue()
    assert "junk.cache: not a readable prompt cache" in out and "other.cache: saved by another model" in out
    assert "damaged.cache: the saved conversation is damaged" in out
    session.ask("And again")
    assert session.last.cached_tokens > 0


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
