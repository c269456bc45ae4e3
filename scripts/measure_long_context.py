"""Prefill and decode tokens/s against context length, with the plain and the 8-bit KV cache, on a tiny model.

    python scripts/measure_long_context.py --max-context 131072 --json docs/long_context.json \
        --plot docs/long_context_prefill.png --plot-decode docs/long_context_decode.png

For each length (powers of two from 1K): a fresh cache, the prompt through `Model.prefill` (chunks of 512), then
64 greedy tokens with the compiled decode step. The tiny model (hidden 64, one attention layer of four) makes the
attention over the cache, the part that grows with the context, a large share of each step: the curve's shape,
not its height, is what carries over to the real model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_qwen36 import bench
from mlx_qwen36.fast import make_decode_step


def measure(model, n: int, kv_bits: int | None, decode_tokens: int = 64) -> dict[str, float]:
    rng = np.random.default_rng(n)
    ids = mx.array(rng.integers(0, model.config.text.vocab_size, (1, n)), dtype=mx.int32)
    cache = model.make_cache(kv_bits, 32) if kv_bits else model.make_cache()
    start = time.perf_counter()
    token = mx.argmax(model.prefill(ids, cache), axis=-1)
    mx.eval(token)
    prefill = time.perf_counter() - start
    step = make_decode_step(model)
    token = step(token[:, None], cache)[:, -1].argmax(axis=-1)
    mx.eval(token)  # traces the step at this KV size
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = step(token[:, None], cache)[:, -1].argmax(axis=-1)
        mx.eval(token)
    decode = time.perf_counter() - start
    return {"prefill_tokens_per_s": n / prefill, "decode_tokens_per_s": decode_tokens / decode,
            "kv_bytes": sum(c.nbytes for c in cache if hasattr(c, "keys"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-context", type=int, default=131072)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--plot-decode", type=Path)
    args = p.parse_args()
    model, _ = bench.synthetic_model("tiny", {"max_position_embeddings": 262144}, mx.float32, 0)
    lengths = [n for n in (1 << k for k in range(10, 21)) if n <= args.max_context]
    results: dict[str, dict[int, dict]] = {"plain KV": {}, "8-bit KV": {}}
    for n in lengths:
        for label, bits in (("plain KV", None), ("8-bit KV", 8)):
            results[label][n] = r = measure(model, n, bits)
            print(f"{label:9s} {n:>7,} tokens: prefill {r['prefill_tokens_per_s']:8.0f} tok/s, decode "
                  f"{r['decode_tokens_per_s']:7.1f} tok/s, KV {r['kv_bytes'] / 1e6:7.1f} MB", flush=True)
    report = {"machine": bench.machine(), "model": "synthetic tiny (fp32)", "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    machine = f"{report['machine']['cpu']}, {report['machine']['cores']} cores"
    for path, key, what in ((args.plot, "prefill_tokens_per_s", "Prefill"),
                            (args.plot_decode, "decode_tokens_per_s", "Decode")):
        if path:
            bench.plot_series({label: {n: r[key] for n, r in rs.items()} for label, rs in results.items()}, path,
                              f"{what} tokens/s against context, tiny model, fp32 - {machine}",
                              "context (tokens, log scale)")


if __name__ == "__main__":
    main()
