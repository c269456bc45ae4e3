"""`python -m mlx_qwen36.chat`: a terminal chat with Qwen3.6, streaming, with reasoning shown dimmed.

A thin shell over the library: `load`, `stream_generate` and a `PromptCache` that carries the conversation, so
each turn only prefills what is new. Ctrl-C stops the current answer and returns to the prompt; the cache rolls
back to the last token it finished, and the partial answer stays in the conversation as it was shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .cli import (
    add_model_argument,
    add_runtime_arguments,
    add_sampling_arguments,
    kv_kwargs,
    load_planned,
    sampling_kwargs,
    speculation_line,
)
from .generator import DEFAULT_MAX_TOKENS, GenerationChunk, stream_generate
from .loader import load
from .prompt_cache import PromptCache, PromptCacheError, make_prompt_cache

HELP = """commands:
  /think on|off        thinking before answering (now: {think})
  /reasoning show|hide show the model's reasoning, dimmed (now: {show})
  /system [TEXT]       set the system prompt (empty clears it) and start over
  /reset               start a new conversation
  /save PATH           save the conversation and its prompt cache
  /load PATH           go on with a saved conversation (its prompt cache spares the prefill)
  /stats               statistics of the last answer
  /image PATH, /video PATH   attach an image or a video to the next message
  /help                this list
  /quit                leave (Ctrl-D too)
A line ending in \\ continues on the next line; Ctrl-C stops an answer."""


@dataclass
class Session:
    model: Any
    processor: Any
    sampling: dict[str, Any]
    max_tokens: int = DEFAULT_MAX_TOKENS
    system: str | None = None
    think: bool = True
    preserve_thinking: bool = False
    show_reasoning: bool = True
    out: TextIO = sys.stdout
    color: bool = False
    kv: dict[str, Any] = field(default_factory=dict)  # make_prompt_cache's kv_bits / kv_group_size
    messages: list[dict] = field(default_factory=list)
    cache: PromptCache | None = None
    last: GenerationChunk | None = None
    attachments: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = make_prompt_cache(self.model, **self.kv)

    def write(self, text: str, dim: bool = False) -> None:
        if dim and self.color:
            text = f"\x1b[2m{text}\x1b[0m"
        self.out.write(text)
        self.out.flush()

    def ask(self, text: str) -> None:
        """Send a user message (with any attached media) and stream the answer."""
        content: str | list[dict] = [*self.attachments, {"type": "text", "text": text}] if self.attachments else text
        self.attachments = []
        self.messages.append({"role": "user", "content": content})
        self.last = None
        parts = {"reasoning": [], "content": []}
        calls: list[dict] = []
        phase = None
        try:
            for chunk in stream_generate(self.model, self.processor, self.messages, max_tokens=self.max_tokens,
                                         enable_thinking=self.think, preserve_thinking=self.preserve_thinking,
                                         prompt_cache=self.cache, **self.sampling):
                self.last = chunk
                if chunk.phase in parts and chunk.text:
                    parts[chunk.phase].append(chunk.text)
                    if chunk.phase == "reasoning" and not self.show_reasoning:
                        continue
                    if chunk.phase != phase:
                        self.write("\n" if phase else "")
                        phase = chunk.phase
                    self.write(chunk.text, dim=chunk.phase == "reasoning")
                for call in chunk.tool_calls:
                    calls.append(call.to_openai())
                    self.write(f"\n[tool call] {call.name}({call.arguments_json()})\n")
        except KeyboardInterrupt:
            self.write("\n[interrupted]")
        except (ValueError, ImportError):
            self.messages.pop()  # the message was refused (too long, unreadable media): not part of the conversation
            raise
        reply = {"role": "assistant", "content": "".join(parts["content"]),
                 "reasoning_content": "".join(parts["reasoning"])}
        if calls:
            reply["tool_calls"] = calls
        self.messages.append(reply)
        self.write("\n")
        if self.last is not None:
            self.write(self.stats() + "\n", dim=True)

    def stats(self) -> str:
        c = self.last
        if c is None:
            return "no answer yet"
        return (f"[{c.prompt_tokens} prompt tokens ({c.cached_tokens} cached), {c.prompt_tps:.1f} tok/s prefill | "
                f"{c.generation_tokens} tokens, {c.generation_tps:.1f} tok/s | peak {c.peak_memory_gb:.2f} GB | "
                f"{c.finish_reason or 'interrupted'}"
                + (f" | {line}" if (line := speculation_line(c)) else "") + "]")

    def attach(self, kind: str, path: Path) -> None:
        """Queue an image or video for the next message (checked now, so a typo is caught before asking)."""
        if not getattr(self.model, "has_vision", False):
            self.write(f"error: this model was loaded without its vision tower; /{kind} is not available\n")
        elif not path.is_file():
            self.write(f"error: no such file: {path}\n")
        else:
            self.attachments.append({"type": f"{kind}_url", f"{kind}_url": {"url": str(path)}})
            self.write(f"attached {kind} {path.name}; it goes with your next message\n")

    def save(self, path: Path) -> None:
        """Save the conversation with its prompt cache, so `load` goes on where it stopped."""
        conversation = {"messages": self.messages, "system": self.system, "think": self.think}
        self.cache.save(path, conversation=conversation)
        self.write(f"saved the conversation ({len(self.messages)} messages, {len(self.cache.tokens)} cached tokens) "
                   f"to {path}\n")

    def load(self, path: Path) -> None:
        """Go on with a saved conversation; if the file cannot be used, the current one stays as it is."""
        try:
            cache = PromptCache.load(self.model, path)
            saved = saved_conversation(cache.conversation, path)
        except PromptCacheError as e:
            self.write(f"error: {e}\n")
            return
        self.cache = cache
        if saved is None:
            self.write(f"loaded a prompt cache of {len(cache.tokens)} tokens (it holds no conversation; the current "
                       "one goes on)\n")
            return
        self.messages, self.system, self.think = saved
        self.write(f"loaded the conversation ({len(self.messages)} messages, {len(cache.tokens)} cached tokens)\n")

    def command(self, line: str) -> bool:
        """Run a /command; returns False when the session should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.write(HELP.format(think="on" if self.think else "off",
                                   show="show" if self.show_reasoning else "hide") + "\n")
        elif name == "/think" and arg in ("on", "off"):
            self.think = arg == "on"
            self.write(f"thinking {arg}\n")
        elif name == "/reasoning" and arg in ("show", "hide"):
            self.show_reasoning = arg == "show"
            self.write(f"reasoning {'shown' if self.show_reasoning else 'hidden'}\n")
        elif name == "/system":
            self.system = arg or None
            self.reset()
            self.write("system prompt set; new conversation\n" if arg else "system prompt cleared\n")
        elif name == "/reset":
            self.reset()
            self.write("new conversation\n")
        elif name == "/stats":
            self.write(self.stats() + "\n")
        elif name == "/save" and arg:
            self.save(Path(arg).expanduser())
        elif name == "/load" and arg:
            self.load(Path(arg).expanduser())
        elif name in ("/image", "/video") and arg:
            self.attach(name[1:], Path(arg).expanduser())
        else:
            self.write(f"unknown command or missing argument: {line} (try /help)\n")
        return True


def saved_conversation(saved: Any, path: Path) -> tuple[list[dict], str | None, bool] | None:
    """(messages, system prompt, think) from what `Session.save` stored; None when the cache holds none."""
    if saved is None:
        return None
    try:
        messages, system, think = saved["messages"], saved["system"], saved["think"]
    except (KeyError, TypeError):
        raise PromptCacheError(f"{path}: the saved conversation is damaged") from None
    if (not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)
            or not isinstance(system, (str, type(None))) or not isinstance(think, bool)):
        raise PromptCacheError(f"{path}: the saved conversation is damaged")
    return messages, system, think


def read_message(prompt: str = ">>> ") -> str:
    """One message; a trailing backslash continues it on the next line."""
    lines = []
    while True:
        line = input(prompt if not lines else "... ")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen36.chat", description="Chat with Qwen3.6 in the terminal.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_argument(p)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per answer at most")
    add_sampling_arguments(p)
    p.add_argument("--no-think", action="store_true", help="answer without thinking first")
    p.add_argument("--preserve-thinking", action="store_true",
                   help="keep past reasoning in the conversation (reuses the whole history from the cache)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning")
    p.add_argument("--system", default=None, help="system prompt")
    add_runtime_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"loading {args.model} ...", flush=True)
    start = time.perf_counter()
    try:
        model, processor = load_planned(args, load, vision=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sampling = dict(sampling_kwargs(args), draft_tokens=args.mtp)
    session = Session(model, processor, sampling, max_tokens=args.max_tokens, system=args.system, kv=kv_kwargs(args),
                      think=not args.no_think, preserve_thinking=args.preserve_thinking,
                      show_reasoning=not args.hide_reasoning,
                      color=sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    print(f"ready in {time.perf_counter() - start:.1f} s. /help for commands, Ctrl-D to quit.")
    while True:
        try:
            line = read_message()
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not session.command(line.strip()):
                    return 0
            else:
                session.ask(line)
        except (ValueError, ImportError, OSError) as e:
            print(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
