"""Command-line pieces the chat, the one-shot generator (and later the server) share: the model argument and the
sampling flags, with one meaning everywhere."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from .sampling import PRESETS
from .speculative import MAX_DEPTH

DEFAULT_MODEL = "mlx-community/Qwen3.6-35B-A3B-4bit"


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("MLX_QWEN36_MODEL", DEFAULT_MODEL),
                   help=f"local folder or Hugging Face repo id (default: $MLX_QWEN36_MODEL, else {DEFAULT_MODEL})")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling flags; None means the checkpoint's generation_config.json (or the preset) decides."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sampling preset from the model card (default: the checkpoint's generation_config.json)")
    p.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `stream_generate` sampling arguments of `add_sampling_arguments`' flags."""
    return {"preset": args.preset, "temperature": args.temp, "top_p": args.top_p, "top_k": args.top_k,
            "min_p": args.min_p, "presence_penalty": args.presence_penalty,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def _draft_tokens(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1-{MAX_DEPTH} or auto, got {text!r}") from None
    if not 1 <= value <= MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"expected 1-{MAX_DEPTH} or auto, got {value}")
    return value


def add_context_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="longest prompt + reply in tokens; past the checkpoint's native context (262,144) rotary "
                        "switches to YaRN (factor 4, up to 1,048,576)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--mtp, --max-context, --kv-bits and --kv-group-size: how a loaded model runs, the same on every command."""
    add_mtp_argument(p)
    add_context_argument(p)
    add_kv_arguments(p)


def load_planned(args: argparse.Namespace, load: Callable[..., Any], vision: bool, **kwargs: Any) -> tuple[Any, Any]:
    """The memory plan first (`planned_context`), then `load(args.model, ...)` with --mtp and --max-context, the
    model's context capped at what the plan allows."""
    from .memory import limit_context

    context = planned_context(args, vision=vision, mtp=args.mtp is not None)
    model, processor = load(args.model, mtp=args.mtp is not None, max_context=args.max_context, **kwargs)
    limit_context(model, context)
    return model, processor


def planned_context(args: argparse.Namespace, vision: bool, mtp: bool) -> int:
    """The memory plan, before loading: MemoryPlanError (a ValueError) for a --max-context that does not fit this
    machine, naming the longest that does; else the context to serve (the checkpoint's, capped at what fits)."""
    from .loader import resolve_model_path
    from .memory import check_fits

    return check_fits(resolve_model_path(args.model), args.max_context, kv_bits=args.kv_bits,
                      kv_group_size=args.kv_group_size, mtp=mtp, vision=vision)


def add_kv_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="keep the attention layers' KV cache quantized (mlx-lm's flag; 8 is near-lossless)")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64, help="group size of --kv-bits")


def kv_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size} if args.kv_bits else {}


def add_mtp_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mtp", type=_draft_tokens, nargs="?", const="auto", default=None, metavar="K",
                   help=f"speculative decoding with the checkpoint's MTP head: at most K (1-{MAX_DEPTH}) drafted "
                        "tokens per step, or auto (the default K); the depth adapts to what pays, the output is "
                        "the same")


def speculation_line(c: Any) -> str | None:
    """`MTP: 1.84 tokens per forward, acceptance 0.81 0.58` for a chunk of a speculative generation, else None."""
    if c.tokens_per_forward is None:
        return None
    drafted = [f"{a:.2f}" for a in c.draft_acceptance]
    while len(drafted) > 1 and drafted[-1] == "0.00":
        drafted.pop()
    return f"MTP: {c.tokens_per_forward:.2f} tokens per forward, acceptance by position {' '.join(drafted)}"
