"""Ask Qwen3.6 one question and print its reasoning, its answer and the generation statistics.

    python examples/generate.py "Why is the sky blue?"
    python examples/generate.py --no-think --max-tokens 256 "Name three prime numbers."
    python examples/generate.py --mtp 2 "Write a haiku."   # speculative decoding with the MTP head

The model is $MLX_QWEN36_MODEL when set, else --model (a local folder or a Hugging Face repo id).
"""

from __future__ import annotations

import argparse
import os

import mlx_qwen36

DEFAULT_MODEL = "mlx-community/Qwen3.6-35B-A3B-4bit"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="How many r's are in the word 'strawberry'?")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="folder or Hub repo id ($MLX_QWEN36_MODEL wins)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-think", action="store_true", help="answer directly, without a reasoning phase")
    parser.add_argument("--mtp", type=int, default=None, metavar="K",
                        help="draft up to K tokens per step with the checkpoint's MTP head (the answer is the same)")
    args = parser.parse_args(argv)

    model_path = os.environ.get("MLX_QWEN36_MODEL") or args.model
    model, processor = mlx_qwen36.load(model_path, mtp=args.mtp is not None)

    result = mlx_qwen36.generate(
        model, processor, args.prompt,
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
        enable_thinking=not args.no_think, draft_tokens=args.mtp,
    )

    if result.reasoning.strip():
        print("=== reasoning ===")
        print(result.reasoning.strip())
    print("=== answer ===")
    print(result.content.strip())
    print("=== stats ===")
    print(f"prompt: {result.prompt_tokens} tokens at {result.prompt_tps:.1f} tok/s | "
          f"generated: {len(result.tokens)} tokens at {result.generation_tps:.1f} tok/s | "
          f"finish: {result.finish_reason} | peak memory: {result.peak_memory_gb:.2f} GB")
    if result.tokens_per_forward is not None:
        print(f"MTP: {result.tokens_per_forward:.2f} tokens per forward, acceptance by position "
              + " ".join(f"{a:.2f}" for a in result.draft_acceptance))


if __name__ == "__main__":
    main()
