"""`python -m mlx_qwen36.generate`: one prompt in, one answer out, as `mlx_lm.generate` users expect.

stdout gets the answer and nothing else (so `> answer.txt` captures just it); the reasoning (dimmed on a terminal)
and the statistics go to stderr. The flags follow mlx-lm's where they mean the same thing (`-p`, `-m`,
`--system-prompt`, `--verbose False`). Later flags slot in at two places: `parser()` declares them and
`generation_kwargs()` turns them into `stream_generate` arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
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
from .multimodal import with_media
from .tool_parser import CONTENT, REASONING

SEPARATOR = "=========="


def _bool(text: str) -> bool:
    """mlx-lm's `--verbose True|False` spelling (also t/f, yes/no, 1/0)."""
    value = text.strip().lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_qwen36.generate",
                                description="Answer one prompt with Qwen3.6: the answer on stdout, reasoning and "
                                            "statistics on stderr.")
    add_model_argument(p)
    p.add_argument("--prompt", "-p", required=True, help="the user message; '-' reads it from stdin")
    p.add_argument("--system", "--system-prompt", default=None, help="system prompt")
    # extend + nargs="+": both mlx-lm's `--image a.png b.png` and a repeated `--image a.png --image b.png`.
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="FILE", help="image file(s)")
    p.add_argument("--video", action="extend", nargs="+", default=[], metavar="FILE",
                   help='video file(s); needs pip install "mlx-qwen36[video]"')
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help="tokens to generate at most, reasoning included (default: %(default)s)")
    add_sampling_arguments(p)
    add_runtime_arguments(p)
    p.add_argument("--no-think", action="store_true", help="answer without thinking first")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning on stderr")
    # One setting, two spellings; the last one given wins.
    p.add_argument("--verbose", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="print reasoning and statistics on stderr; --verbose False is --quiet")
    p.add_argument("--quiet", "-q", dest="verbose", action="store_false",
                   help="stderr only for errors: no reasoning, no statistics")
    return p


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `stream_generate` keyword arguments the flags ask for."""
    return {"max_tokens": args.max_tokens, "enable_thinking": not args.no_think, "draft_tokens": args.mtp,
            **sampling_kwargs(args), **kv_kwargs(args)}


def read_prompt(prompt: str, stdin: TextIO) -> str:
    """The prompt text; `-` reads stdin, whose trailing newline (from echo or a file) is not part of the message."""
    text = stdin.read().rstrip("\r\n") if prompt == "-" else prompt
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


def messages(prompt: str, args: argparse.Namespace) -> list[dict]:
    """The conversation: the system prompt if any, then the user message with its media before the text."""
    media = args.image or args.video
    user = with_media(prompt, args.image, args.video) if media else [{"role": "user", "content": prompt}]
    return ([{"role": "system", "content": args.system}] if args.system else []) + user


def check_media_files(args: argparse.Namespace) -> None:
    """Missing files are reported before the model loads: a typo should not cost a load (or a download)."""
    for flag, sources in (("--image", args.image), ("--video", args.video)):
        for source in sources:
            if not source.startswith(("data:", "file:")) and not Path(source).is_file():
                raise ValueError(f"{flag} {source}: no such file")


@dataclass
class Printer:
    """Routes the stream: the answer to `out`, which gets nothing else; reasoning and notes to `err`."""

    out: TextIO
    err: TextIO
    verbose: bool
    show_reasoning: bool
    dim: bool
    started: bool = False
    reasoning_open: bool = False

    def write(self, chunk: GenerationChunk) -> None:
        self.started = True
        if chunk.phase == REASONING and chunk.text and self.verbose and self.show_reasoning:
            self.err.write(f"\x1b[2m{chunk.text}\x1b[0m" if self.dim else chunk.text)
            self.err.flush()
            self.reasoning_open = True
        elif chunk.phase == CONTENT and chunk.text:
            self.end_reasoning()
            self.out.write(chunk.text)
            self.out.flush()
        for call in chunk.tool_calls:  # no tools are offered, but a model may call one anyway: say so, run nothing
            self.note(f"[tool call, not run] {call.name}({call.arguments_json()})")

    def end_reasoning(self) -> None:
        if self.reasoning_open:
            self.err.write("\n")
            self.reasoning_open = False

    def note(self, line: str) -> None:
        if self.verbose:
            self.end_reasoning()
            self.err.write(line + "\n")
            self.err.flush()

    def close(self) -> None:
        """End the answer with its newline, once it has begun (an error before it leaves stdout empty)."""
        self.end_reasoning()
        if self.started:
            self.out.write("\n")
            self.out.flush()


def stats(c: GenerationChunk) -> str:
    """mlx-lm's statistics block, with the cached prompt tokens and the finish reason."""
    return (f"{SEPARATOR}\n"
            f"Prompt: {c.prompt_tokens} tokens ({c.cached_tokens} cached), {c.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {c.generation_tokens} tokens, {c.generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {c.peak_memory_gb:.3f} GB\n"
            + (f"{line}\n" if (line := speculation_line(c)) else "")
            + f"Finish reason: {c.finish_reason or 'interrupted'}")


def run(args: argparse.Namespace, printer: Printer) -> None:
    prompt = read_prompt(args.prompt, sys.stdin)
    check_media_files(args)
    # Without media the vision tower would only take memory (0.875 GB in bf16): the flags say up front.
    media = bool(args.image or args.video)
    model, processor = load_planned(args, load, vision=media, text_only=not media)
    last = None
    try:
        for chunk in stream_generate(model, processor, messages(prompt, args), **generation_kwargs(args)):
            printer.write(chunk)
            last = chunk
    finally:  # also on Ctrl-C: the partial answer gets its newline, and the statistics say how far it got
        printer.close()
        if last is not None:
            printer.note(stats(last))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    printer = Printer(sys.stdout, sys.stderr, verbose=args.verbose, show_reasoning=not args.hide_reasoning,
                      dim=sys.stderr.isatty() and "NO_COLOR" not in os.environ)
    try:
        run(args, printer)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, and point stdout at devnull so the exit-time flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, ImportError) as e:  # bad model folder, unreadable media, prompt too long, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
