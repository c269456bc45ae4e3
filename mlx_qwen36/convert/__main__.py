"""`python -m mlx_qwen36.convert` / `mlx-qwen36-convert`: Hugging Face Qwen3.6 -> MLX checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..loader import CheckpointError
from .converter import ConversionError, ConvertOptions, convert
from .quantize import GROUP_SIZES, MODES, RECIPES


def parser() -> argparse.ArgumentParser:
    d = ConvertOptions()
    p = argparse.ArgumentParser(
        prog="python -m mlx_qwen36.convert",
        description="Convert a Hugging Face Qwen3.6 checkpoint (35B-A3B MoE or 27B dense) into an MLX checkpoint, "
                    "streaming tensor by tensor. The output is written to a temporary folder beside --mlx-path and "
                    "moved into place only when complete.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--hf-path", required=True, help="local checkpoint folder or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output folder (must be empty or absent unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the matmul weights")
    p.add_argument("--bits", type=int, default=d.bits, help="bits per weight for quantized layers")
    p.add_argument("--group-size", type=int, default=d.group_size, choices=GROUP_SIZES,
                   help="weights sharing one scale (mxfp modes need 32)")
    p.add_argument("--mode", default=d.mode, choices=sorted(MODES), help="quantization mode")
    p.add_argument("--recipe", default=d.recipe, choices=RECIPES,
                   help="uniform: every matmul at --bits; mixed: routed experts at --bits, attention, GDN, shared "
                        "expert, embeddings and lm_head at 8 bits. Router and shared-expert gate are 8-bit always")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"],
                   help="dtype of unquantized weights (A_log, dt_bias and norms stay float32)")
    p.add_argument("--drop-mtp", action="store_true", help="leave out the multi-token-prediction head (mtp.*)")
    p.add_argument("--drop-vision", action="store_true", help="leave out the vision tower (text-only checkpoint)")
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower's matmuls too")
    p.add_argument("--force", action="store_true", help="replace a non-empty --mlx-path")
    p.add_argument("--upload-repo", default=None, help="upload the result to this Hugging Face repo id")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = convert(
            args.hf_path, args.mlx_path, force=args.force, upload_repo=args.upload_repo, quantize=args.quantize,
            bits=args.bits, group_size=args.group_size, mode=args.mode, recipe=args.recipe, dtype=args.dtype,
            drop_mtp=args.drop_mtp, drop_vision=args.drop_vision, quantize_vision=args.quantize_vision,
        )
    except (ConversionError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 130 if "interrupted" in str(e) else 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
