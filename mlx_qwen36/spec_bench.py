"""What MTP speculation costs and brings on this machine: `python -m mlx_qwen36.bench --mtp`.

Measured on the benchmark's model (its MTP head included): the time of a plain decode step (the compiled step), of
one draft (an MTP forward of one token and the lm_head), and of a verification of m + 1 tokens (the main model's
forward recording the GDN states, and the rollback); from them, the break-even acceptance rate of each depth m
(the per-position rate a at which 1 + a + ... + a^m tokens per round cost as much as plain decoding) and the
tokens/s a rate would give. Then decoding itself, greedy: plain; `draft_tokens="auto"` (the adaptive depth, which
must not lose to plain decoding) in a first generation, which measures the costs, and in the next, which starts
from them; and a fixed depth with the gate off (with random MTP weights every draft is rejected: the worst case).
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx

from . import speculative as spec
from .cache import recording_steps
from .cache import restore as restore_cache
from .cache import snapshot as snapshot_cache
from .fast import decode_step
from .generator import PlainDecoder, prefill
from .ops.kernels import measure
from .positions import text_position_ids
from .prompt_cache import PromptCache
from .sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
RATES = (0.5, 0.6, 0.7, 0.8, 0.9)


def costs(model: Any, prompt: list[int], depths: range, repeats: int = 3) -> dict[str, Any]:
    """Seconds of a plain step, a draft and a verify of m + 1 tokens, after `prompt`."""
    pc = PromptCache(model)
    prefill(model, pc, prompt, 0, 512)
    cache, step = pc.cache, decode_step(model)
    token = mx.array([[prompt[-1]]])

    def plain() -> None:
        before = snapshot_cache(cache)
        mx.eval(step(token, cache), [c.state for c in cache])
        restore_cache(cache, before)

    def verify(m: int) -> None:
        before = snapshot_cache(cache)
        with recording_steps(cache):
            hidden = model.model(mx.array([prompt[-1:] * (m + 1)]), cache)
        mx.eval(model.logits(hidden), [c.state for c in cache], [c.steps for c in cache if hasattr(c, "steps")])
        restore_cache(cache, before)

    mtp_cache = model.mtp.make_cache()
    hidden = model.model(mx.array([prompt]), model.make_cache())
    embeddings = model.model.embed_tokens(mx.array([prompt]))
    model.mtp(hidden[:, :-1], embeddings[:, 1:], mtp_cache, position_ids=text_position_ids(0, len(prompt) - 1))
    mx.eval([c.state for c in mtp_cache])

    def draft() -> None:
        offsets = [c.offset for c in mtp_cache]
        out = model.mtp(hidden[:, -1:], embeddings[:, -1:], mtp_cache,
                        position_ids=text_position_ids(len(prompt) - 1, 1))
        mx.eval(model.logits(out))
        for c, o in zip(mtp_cache, offsets):
            c.restore(o)

    return {"plain_s": measure(plain, (), repeats), "draft_s": measure(draft, (), repeats),
            "verify_s": {m: measure(lambda m=m: verify(m), (), repeats) for m in depths}}


def break_even(c: dict[str, Any], m: int) -> float | None:
    """The per-position acceptance rate at which depth m matches plain decoding (None: not even at 1)."""
    cost = (c["verify_s"][m] + m * c["draft_s"]) / c["plain_s"]

    def tokens(a: float) -> float:
        return sum(a**j for j in range(m + 1))

    if tokens(1.0) < cost:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens(mid) < cost else (lo, mid)
    return hi


def projected(c: dict[str, Any], m: int, rate: float) -> float:
    """Tokens/s at depth m with per-position acceptance `rate`, from the measured costs."""
    return sum(rate**j for j in range(m + 1)) / (c["verify_s"][m] + m * c["draft_s"])


def decode(model: Any, prompt: list[int], n: int, draft_tokens: int | str | None,
           adaptive: bool = True) -> dict[str, Any]:
    """Greedy tokens/s over n tokens after `prompt` (plain, or speculative), and the speculation statistics."""
    pc = PromptCache(model)
    sampler = Sampler(GREEDY)
    depth = spec.parse_draft_tokens(draft_tokens)
    source: Any = (spec.SpeculativeDecoder(model, pc, sampler, depth, adaptive=adaptive) if depth
                   else PlainDecoder(model, pc, sampler, 0))
    logits = prefill(model, pc, prompt, 0, 512, on_hidden=source.prompt_chunk if depth else None)
    generated = [source.start(logits, [])]
    start = time.perf_counter()
    while len(generated) < n:
        generated.append(source.next(generated))
    seconds = time.perf_counter() - start
    source.close()
    out: dict[str, Any] = {"tokens_per_s": (n - 1) / seconds, "tokens": generated}
    if depth:
        out.update(acceptance=source.stats.acceptance, tokens_per_forward=source.stats.tokens_per_forward)
    return out


def measure_mtp(model: Any, prompt: list[int], n: int, depths: range = range(1, spec.MAX_DEPTH + 1)
                ) -> dict[str, Any]:
    c = costs(model, prompt, depths)
    decode(model, prompt, n, None)  # traces the compiled step for every KV size the runs reach
    plain = decode(model, prompt, n, None)
    model.__dict__.pop("_depth_controllers", None)  # the adaptive depth starts from nothing measured
    first = decode(model, prompt, n, "auto")
    auto = decode(model, prompt, n, "auto")  # the next generation starts from what the first one measured
    gate = spec.CONFIDENCE_GATE
    spec.CONFIDENCE_GATE = 0.0  # every round drafts as deep as asked: the cost of rejections, measured
    try:
        fixed = {m: decode(model, prompt, n, m, adaptive=False) for m in (1, 2)}
    finally:
        spec.CONFIDENCE_GATE = gate
    same = all(r["tokens"] == plain["tokens"] for r in (*fixed.values(), first, auto))
    return {
        "plain_ms": c["plain_s"] * 1e3, "draft_ms": c["draft_s"] * 1e3,
        "verify_ms": {m: v * 1e3 for m, v in c["verify_s"].items()},
        "break_even_acceptance": {m: break_even(c, m) for m in depths},
        "projected_tokens_per_s": {m: {r: projected(c, m, r) for r in RATES} for m in depths},
        "plain_tokens_per_s": plain["tokens_per_s"],
        "fixed_depth_tokens_per_s": {m: r["tokens_per_s"] for m, r in fixed.items()},
        "fixed_depth_acceptance": {m: r["acceptance"] for m, r in fixed.items()},
        "auto_first_tokens_per_s": first["tokens_per_s"],
        "auto_tokens_per_s": auto["tokens_per_s"], "auto_acceptance": auto["acceptance"],
        "auto_tokens_per_forward": auto["tokens_per_forward"], "greedy_identical": same,
    }


def markdown(r: dict[str, Any]) -> str:
    depths = list(r["verify_ms"])
    lines = ["", f"MTP speculation (greedy): a plain step {r['plain_ms']:.1f} ms, a draft {r['draft_ms']:.1f} ms.", "",
             "| depth m | verify of m+1 tokens (ms) | break-even acceptance | "
             + " | ".join(f"tok/s at {a:.0%}" for a in RATES) + " |",
             "|---:|---:|---:|" + "---:|" * len(RATES)]
    for m in depths:
        be = r["break_even_acceptance"][m]
        lines.append(f"| {m} | {r['verify_ms'][m]:.1f} | {'never' if be is None else f'{be:.2f}'} | "
                     + " | ".join(f"{r['projected_tokens_per_s'][m][a]:.2f}" for a in RATES) + " |")
    lines += ["", "| decoding | tok/s | acceptance by position |", "|---|---:|---|",
              f"| plain | {r['plain_tokens_per_s']:.3f} | |"]
    for m, v in r["fixed_depth_tokens_per_s"].items():
        acc = " ".join(f"{a:.2f}" for a in r["fixed_depth_acceptance"][m][:m])
        lines.append(f"| depth {m}, no gate | {v:.3f} | {acc} |")
    acc = " ".join(f"{a:.2f}" for a in r["auto_acceptance"])
    lines.append(f"| auto, first generation (measuring the costs) | {r['auto_first_tokens_per_s']:.3f} | |")
    lines.append(f"| auto, next generation ({r['auto_tokens_per_forward']:.2f} tokens per forward) | "
                 f"{r['auto_tokens_per_s']:.3f} | {acc} |")
    lines.append(f"\nGreedy tokens identical with and without MTP: {r['greedy_identical']}.")
    return "\n".join(lines) + "\n"
