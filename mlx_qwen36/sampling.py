"""Token sampling: penalties, temperature, top-k / top-p / min-p truncation and a seeded MLX PRNG.

Order of operations (the vLLM order; HF `generate` agrees apart from having no frequency/presence penalty):

1. repetition penalty (HF/CTRL style) over the last `repetition_context_size` generated tokens;
2. frequency and presence penalties (OpenAI definition) over *all* generated tokens;
3. greedy stops here: argmax of the penalised logits (vLLM's greedy path also sees the penalties);
4. temperature;
5. top-k, then top-p on the top-k survivors, then min-p (HF warper order and vLLM's pre-V1 sampler; vLLM V1 runs
   min-p before top-k/top-p, which only differs when both min_p > 0 and top_p < 1: no card preset does that);
6. a categorical draw with a per-sampler MLX PRNG key, split once per sampled token.

Penalties come before temperature because they are defined on raw logits (OpenAI, vLLM), so a penalty of 1.5 means
the same thing at every temperature. Truncation comes after temperature because top-p and min-p are defined on the
distribution actually sampled from.

Everything is float32. Truncation works on candidate ids rather than the 248,320-entry vocabulary: top-k is an
argpartition and top-p sorts only the k survivors (the full vocabulary only when top_k == 0, which costs ~60 ms on
the CPU backend). Token counts for the penalties are kept incrementally by the Sampler, so a long history costs
O(new tokens) per step rather than O(history).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

TokenIds = Sequence[int] | np.ndarray | mx.array

# Below this a temperature is treated as greedy, as vLLM does: dividing by it would overflow float32 logits.
GREEDY_EPS = 1e-5


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults are neutral (plain sampling at temperature 1, nothing truncated or penalised).

    temperature: 0 means greedy (argmax after penalties).
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    min_p: drop tokens whose probability is below min_p * the top probability; 0 disables it.
    presence_penalty, frequency_penalty: OpenAI definition, in [-2, 2] like the OpenAI and vLLM APIs; 0 disables.
    repetition_penalty: HF/CTRL multiplicative penalty, > 0; 1 disables it.
    repetition_context_size: how many of the most recent generated tokens the repetition penalty looks at; None
        means all of them (HF and vLLM). The default of 64 (mlx-lm uses 20) covers a few sentences, so it catches
        loops, without penalising newlines and common words for the whole of an 80k-token thinking trace.
    seed: seeds this sampler's PRNG key, so the same seed gives the same tokens; None uses MLX's global PRNG.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int | None = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if _check_real("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < _check_real("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if not 0 <= _check_real("min_p", self.min_p) <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= _check_real(name, getattr(self, name)) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if _check_real("repetition_penalty", self.repetition_penalty) <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = disabled), got {self.repetition_penalty}")
        size = self.repetition_context_size
        if size is not None and (not _is_int(size) or size < 1):
            raise ValueError(f"repetition_context_size must be an integer >= 1 or None, got {size!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


# Recommended settings from the Qwen3.6-35B-A3B model card. The 27B card differs only in "thinking-general",
# where it gives presence_penalty 0.0: use dataclasses.replace(preset("thinking-general"), presence_penalty=0.0).
PRESETS: dict[str, SamplingParams] = {
    "thinking-general": SamplingParams(temperature=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5,
                                       repetition_penalty=1.0),
    "thinking-coding": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=0.0,
                                      repetition_penalty=1.0),
    "instruct": SamplingParams(temperature=0.7, top_p=0.80, top_k=20, min_p=0.0, presence_penalty=1.5,
                               repetition_penalty=1.0),
}


def preset(name: str) -> SamplingParams:
    """The model card's recommended settings for `name` (one of PRESETS)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown sampling preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def from_generation_config(source: str | Path | Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from a generation_config.json (a dict, the file, or the model directory holding it).

    Reads temperature, top_p, top_k, min_p, repetition_penalty and presence_penalty where present; other keys
    (token ids, max lengths) are ignored. `do_sample: false` means greedy. A missing `do_sample` is *not* read as
    greedy (HF's default) but the sampling values are used as given, as vLLM does, since files that omit it still
    mean their temperature.
    """
    config = _load_generation_config(source)
    values = {key: config[key] for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                           "presence_penalty") if config.get(key) is not None}
    if config.get("do_sample") is False:
        values["temperature"] = 0.0
    return SamplingParams(**values)


def _load_generation_config(source: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "generation_config.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- penalties -------------------------------------------------------------------------------------------------

def _as_numpy_ids(ids: TokenIds) -> np.ndarray:
    out = np.array(ids, dtype=np.int64).reshape(-1)
    if out.size and out.min() < 0:
        raise ValueError(f"generated token ids must be >= 0, got {int(out.min())}")
    return out


def _penalise(logits: mx.array, params: SamplingParams, rep_ids: np.ndarray, seen_ids: np.ndarray,
              seen_counts: np.ndarray) -> mx.array:
    """Apply the repetition penalty to `rep_ids`, then frequency/presence to `seen_ids` (unique ids, with counts)."""
    vocab = logits.shape[-1]
    for ids in (rep_ids, seen_ids):
        if ids.size and int(ids.max()) >= vocab:
            raise ValueError(f"generated token id {int(ids.max())} is outside the vocabulary ({vocab})")
    if params.repetition_penalty != 1.0 and rep_ids.size:
        # .at[] rather than item assignment, which would also rewrite the caller's array when it is float32.
        idx = mx.array(rep_ids.astype(np.int32))
        factor = mx.where(logits[idx] > 0, 1.0 / params.repetition_penalty, params.repetition_penalty)
        logits = logits.at[idx].multiply(factor)
    if (params.frequency_penalty or params.presence_penalty) and seen_ids.size:
        delta = params.frequency_penalty * seen_counts.astype(np.float32) + params.presence_penalty
        logits = logits.at[mx.array(seen_ids.astype(np.int32))].add(mx.array(-delta.astype(np.float32)))
    return logits


def _repetition_window(generated: np.ndarray, params: SamplingParams) -> np.ndarray:
    size = params.repetition_context_size
    window = generated if size is None else generated[-size:]
    return np.unique(window)


def apply_penalties(logits: mx.array, generated: TokenIds, params: SamplingParams) -> mx.array:
    """Penalised float32 logits [vocab]: repetition penalty over the window, then frequency/presence over all."""
    logits = _as_vector(logits)
    ids = _as_numpy_ids(generated)
    seen_ids, seen_counts = np.unique(ids, return_counts=True)
    return _penalise(logits, params, _repetition_window(ids, params), seen_ids, seen_counts)


class _TokenCounter:
    """Counts of every generated token, updated incrementally so a long history costs O(new tokens) per step.

    The history is assumed to grow by appending; a shorter history, or one whose last counted token changed, is
    recounted from scratch (a new request reusing the sampler).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)
        self.length = 0
        self.last: int | None = None

    def update(self, generated: TokenIds) -> None:
        n = len(generated)
        if n < self.length or (self.length and int(generated[self.length - 1]) != self.last):
            self.reset()
        if n == self.length:
            return
        new = _as_numpy_ids(generated[self.length:])
        if int(new.max()) >= self.counts.size:
            self.counts = np.pad(self.counts, (0, int(new.max()) + 1 - self.counts.size))
        np.add.at(self.counts, new, 1)
        self.length, self.last = n, int(new[-1])

    def seen(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.flatnonzero(self.counts)
        return ids, self.counts[ids]


# --- truncation ------------------------------------------------------------------------------------------------

def _as_vector(logits: mx.array) -> mx.array:
    if logits.ndim == 2 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.ndim != 1:
        raise ValueError(f"logits must have shape [vocab] or [1, vocab], got {tuple(logits.shape)}")
    return logits.astype(mx.float32)


def _top_p_sorted(sorted_logits: mx.array, top_p: float) -> mx.array:
    """Mask (descending) logits outside the smallest prefix whose probability reaches top_p."""
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    # The first token has mass_before == 0 < top_p, so at least one token always survives.
    return mx.where(mass_before < top_p, sorted_logits, -mx.inf)


def _candidates(logits: mx.array, params: SamplingParams) -> tuple[mx.array | None, mx.array]:
    """Temperature then top-k, top-p, min-p on float32 logits [vocab].

    Returns (ids, logits) of the candidates, dropped ones at -inf; ids None means the whole vocabulary in order.
    Greedy params keep only the argmax.
    """
    if params.greedy:
        ids = mx.argmax(logits, keepdims=True)
        return ids, logits[ids]
    logits = logits / params.temperature if params.temperature != 1.0 else logits
    ids = None
    if 0 < params.top_k < logits.shape[-1]:
        # Exactly k survive; ties at the k-th value are broken arbitrarily.
        ids = mx.argpartition(-logits, kth=params.top_k - 1)[: params.top_k]
        logits = logits[ids]
    if params.top_p < 1.0:
        order = mx.argsort(-logits)
        ids = order if ids is None else ids[order]
        logits = _top_p_sorted(logits[order], params.top_p)
    if params.min_p > 0.0:
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p); renormalisation after top-k/p cancels out.
        threshold = logits.max() + math.log(params.min_p)
        logits = mx.where(logits >= threshold, logits, -mx.inf)
    return ids, logits


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature-scaled float32 logits [vocab] with every token that top-k, top-p or min-p drops set to -inf.

    Deterministic; the distribution the sampler draws from is softmax of this. Penalties are not applied here (see
    apply_penalties). Greedy params keep only the argmax, unscaled.
    """
    logits = _as_vector(logits)
    ids, kept = _candidates(logits, params)
    if ids is None:
        return kept
    out = mx.full(logits.shape, -mx.inf, dtype=mx.float32)
    out[ids] = kept
    return out


# --- sampler ---------------------------------------------------------------------------------------------------

class Sampler:
    """Picks the next token from logits and the tokens generated so far; see the module docstring for the order.

    Holds the PRNG key (split once per sampled token) and incremental token counts, so use one Sampler per sequence,
    or call reset() between sequences.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        self._counter = _TokenCounter()
        self.reset()

    def reset(self) -> None:
        """Forget the history and rewind the PRNG key to the seed, so the next sequence repeats the first."""
        self._counter.reset()
        self._key = None if self.params.seed is None else mx.random.key(self.params.seed)

    def sample(self, logits: mx.array, generated: TokenIds = ()) -> mx.array:
        """The next token id as a lazy uint32/int scalar mx.array (lets the caller overlap it with the next step)."""
        logits = self._penalised(_as_vector(logits), generated)
        if self.params.greedy:
            return mx.argmax(logits)
        ids, kept = _candidates(logits, self.params)
        index = mx.random.categorical(kept, key=self._next_key())
        return index if ids is None else ids[index]

    def __call__(self, logits: mx.array, generated: TokenIds = ()) -> int:
        """The next token id as an int."""
        return int(self.sample(logits, generated).item())

    def probabilities(self, logits: mx.array, generated: TokenIds = ()) -> mx.array:
        """The distribution `sample` draws from after `generated`, float32 [vocab] (greedy: one-hot at the argmax):
        what speculative decoding's rejection sampling compares."""
        logits = self._penalised(_as_vector(logits), generated)
        if self.params.greedy:
            return (mx.arange(logits.shape[-1]) == mx.argmax(logits)).astype(mx.float32)
        return mx.softmax(filter_logits(logits, self.params), axis=-1)

    def draw(self, probs: mx.array) -> mx.array:
        """A token from `probs` [vocab] (lazy), with this sampler's PRNG key."""
        return mx.random.categorical(mx.log(probs), key=self._next_key())

    def uniform(self) -> mx.array:
        """A uniform draw in [0, 1) (lazy), with this sampler's PRNG key."""
        return mx.random.uniform(key=self._next_key())

    def _penalised(self, logits: mx.array, generated: TokenIds) -> mx.array:
        p = self.params
        if p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty:
            return logits
        self._counter.update(generated)
        seen_ids, seen_counts = self._counter.seen()
        if p.repetition_penalty == 1.0:
            rep_ids = seen_ids[:0]
        elif p.repetition_context_size is None:
            rep_ids = seen_ids
        else:
            rep_ids = np.unique(_as_numpy_ids(generated[-p.repetition_context_size:]))
        return _penalise(logits, p, rep_ids, seen_ids, seen_counts)

    def _next_key(self) -> mx.array | None:
        if self._key is None:
            return None
        keys = mx.random.split(self._key)
        self._key = keys[0]
        return keys[1]
