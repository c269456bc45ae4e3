"""Speculative decoding with the checkpoint's multi-token-prediction (MTP) head: exact, and only where it pays.

A round starts from t, the token sampled last and not yet fed (it goes at position P), with the MTP cache holding
entries up to some position before P:
1. draft: the MTP runs over the main model's hidden states it has not seen (the previous round's accepted
   positions, each paired with the token after it; the last pair is (h_{P-1}, t)) and drafts d_1 from its last
   output; then d_2 .. d_m, each from its own previous output and the previous draft, a position further.
   Drafting stops early where the MTP's own top probability is below `CONFIDENCE_GATE`. Its cache is then cut
   back to the entries made from the main model's hidden states (the others are remade next round from the real
   ones).
2. verify: the main model feeds [t, d_1 .. d_m] in one forward (the op layer's small-T path), its GDN layers
   recording their per-token states (`cache.recording_steps`).
3. accept: greedy, the longest prefix of drafts equal to the main model's choice, then its choice after it;
   sampling, each draft with probability min(1, p/q), at the first rejection a token from max(p - q, 0)
   renormalised, after all of them one from p (Leviathan et al. 2023; Chen et al. 2023), so every token has
   exactly the distribution plain sampling gives it; p and q are the sampler's own distributions (penalties,
   temperature, top-k/p, min-p) of the main model and of the MTP.
4. rollback: the main cache keeps t and the accepted drafts (`cache.keep_tokens`: KV truncated, GDN states taken
   from the recorded step). Nothing is recomputed.

`DepthController` picks m for each round from measured costs (a plain step, a draft step, a verify of m + 1 tokens)
and a running acceptance rate per draft position, maximising tokens per second; m = 0 is a plain step (the
compiled decode step), so speculation turns itself off where it would be slower, and is probed again now and then.
The MTP's own KV cache covers what this turn fed (the new part of the prompt, then the generated tokens; while
speculation is off, only the last `PLAIN_WINDOW` positions before each probe); earlier turns reach it through the
main model's hidden state only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .cache import atomic, keep_tokens, recording_steps
from .cache import buffers as cache_buffers
from .cache import restore as restore_cache
from .fast import decode_step
from .positions import no_delta, text_position_ids
from .sampling import Sampler

MAX_DEPTH = 4  # drafts per round at most
AUTO_DEPTH = 3  # `draft_tokens="auto"`: three drafts already lose to two on most Macs (PEERS.md §1.6)
CONFIDENCE_GATE = 0.3  # the MTP's top probability below which a round drafts no further
PROBE_EVERY = 16  # plain rounds before the first probe at depth 1 once speculation does not pay
MAX_PROBE_EVERY = 256  # the interval doubles after each probe that does not turn speculation back on
CATCH_UP_CHUNK = 512  # main-model positions the MTP takes in at most at once (prompt prefill)
PLAIN_WINDOW = 64  # while speculation is off, the positions the MTP takes in before a probe (the latest ones)
EMA = 0.2  # weight of a new observation in the running estimates


@dataclass
class SpecStats:
    """What speculation did in one generation: per draft position, the drafts made and accepted."""

    drafted: list[int] = field(default_factory=lambda: [0] * MAX_DEPTH)
    accepted: list[int] = field(default_factory=lambda: [0] * MAX_DEPTH)
    forwards: int = 0  # main-model forwards: verifications and plain steps
    tokens: int = 0  # tokens those forwards produced

    @property
    def acceptance(self) -> list[float]:
        """Acceptance rate per draft position (1, 2, ...), over the rounds that drafted that far."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0


class DepthController:
    """How many tokens to draft next: the depth that maximises expected tokens per second.

    A round at depth m yields 1 + a_1 + a_1 a_2 + ... + a_1..a_m tokens on average (a_j the running acceptance rate
    at position j) and costs a verify, modelled as a plain step times (1 + slope * m), plus m draft steps. The
    first two rounds are plain steps (the faster of the two is the step's cost: the first one may trace the
    compiled step) and the third drafts once, so that every cost has been measured (`measuring`).
    """

    def __init__(self, max_depth: int, adaptive: bool = True):
        self.max_depth, self.adaptive = max_depth, adaptive
        self.alpha = [0.7] * max_depth
        self.step_s: float | None = None
        self.plain_seen = 0
        self.draft_s: float | None = None
        self.slope = 0.2
        self.plain_rounds = 0
        self.probe_every = PROBE_EVERY

    @property
    def measuring(self) -> bool:
        return self.adaptive and (self.plain_seen < 2 or self.draft_s is None)

    def depth(self) -> int:
        if not self.adaptive:
            return self.max_depth
        if self.plain_seen < 2:
            return 0
        if self.draft_s is None:
            return 1
        best, best_rate = 0, 1.0 / self.step_s
        expected = survive = 1.0
        for m in range(1, self.max_depth + 1):
            survive *= self.alpha[m - 1]
            expected += survive
            rate = expected / self._cost(m)
            if rate > best_rate:
                best, best_rate = m, rate
        if best:
            self.plain_rounds, self.probe_every = 0, PROBE_EVERY
            return best
        if all((m + 1) / self._cost(m) <= 1.0 / self.step_s for m in range(1, self.max_depth + 1)):
            self.probe_every = MAX_PROBE_EVERY  # not even every draft accepted would pay here: the costs decide
        self.plain_rounds += 1
        if self.plain_rounds < self.probe_every:
            return 0
        self.plain_rounds, self.probe_every = 0, min(2 * self.probe_every, MAX_PROBE_EVERY)
        return 1

    def _cost(self, m: int) -> float:
        return self.step_s * (1 + self.slope * m) + m * self.draft_s

    def observe_plain(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else min(self.step_s, seconds)
        self.plain_seen += 1

    def observe_round(self, drafted: int, accepted: int, draft_s: float, verify_s: float, mtp_steps: int,
                      gated: bool) -> None:
        """A round that asked for drafts: `drafted` made in `mtp_steps` MTP steps (one more than drafted when the
        gate stopped it, `gated`), `accepted` of them accepted. A gated position counts as a rejection: the MTP
        step was paid for and brought nothing."""
        tested = min(drafted, accepted + 1) + (gated and accepted == drafted)
        for j in range(min(tested, self.max_depth)):  # position j was tested if every draft before it was accepted
            self.alpha[j] = (1 - EMA) * self.alpha[j] + EMA * (1.0 if j < accepted else 0.0)
        per_step = draft_s / max(mtp_steps, 1)
        self.draft_s = per_step if self.draft_s is None else (1 - EMA) * self.draft_s + EMA * per_step
        if self.step_s and drafted:
            slope = max(0.0, (verify_s / self.step_s - 1) / drafted)
            self.slope = (1 - EMA) * self.slope + EMA * slope


def controller(model: Any, depth: int, adaptive: bool = True) -> DepthController:
    """The model's controller for this depth, kept on the model: what one generation measured (the costs, the
    acceptance rates, how rarely to probe) is where the next one starts, so a chat pays the measuring once."""
    kept = model.__dict__.get("_depth_controllers")
    if kept is None:
        kept = {}
        object.__setattr__(model, "_depth_controllers", kept)
    if (depth, adaptive) not in kept:
        kept[(depth, adaptive)] = DepthController(depth, adaptive)
    return kept[(depth, adaptive)]


def parse_draft_tokens(value: int | str | None) -> int | None:
    """`draft_tokens`: None or 0 (off), 1..MAX_DEPTH (at most that many drafts a round), or "auto"."""
    if value is None or value == 0:
        return None
    if value == "auto":
        return AUTO_DEPTH
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEPTH:
        raise ValueError(f"draft_tokens must be 1..{MAX_DEPTH} or 'auto', got {value!r}")
    return value


def accept(sampler: Sampler, logits: mx.array, drafts: list[int], qs: list[mx.array], generated: list[int]
           ) -> tuple[int, int]:
    """(drafts accepted, the token after them) for the main model's logits [m + 1, vocab] at [t, drafts] and the
    distributions `qs` the drafts were drawn from (see the module docstring, step 3)."""
    for j, (d, q) in enumerate(zip(drafts, qs)):
        p = sampler.probabilities(logits[j], generated + drafts[:j])
        if sampler.params.greedy:
            target = int(mx.argmax(p).item())
            if d != target:
                return j, target
            continue
        if sampler.uniform().item() * q[d].item() < p[d].item():
            continue
        residual = mx.maximum(p - q, 0.0)
        total = residual.sum()
        residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p)
        return j, int(sampler.draw(residual).item())
    m = len(drafts)
    return m, int(sampler.sample(logits[m], generated + drafts).item())


class SpeculativeDecoder:
    """The token source of a speculative generation (see the module docstring); `next()` returns tokens one by one.

    Between calls the prompt cache holds the prompt and every token returned but the last, as in plain decoding:
    tokens fed ahead of what was returned (accepted drafts still queued) are recorded as they are returned, and
    `close()` drops from the cache those that never were.
    """

    def __init__(self, model: Any, pc: Any, sampler: Sampler, depth: int, rope_delta: int | mx.array = 0,
                 adaptive: bool = True):
        if "mtp" not in model:
            raise ValueError("speculative decoding needs the model's MTP head: load it with mtp=True "
                             "(load_model(path, mtp=True), or --mtp on the command line)")
        self.model, self.pc, self.sampler, self.rope_delta = model, pc, sampler, rope_delta
        self.controller = controller(model, depth, adaptive)
        self.stats = SpecStats()
        self.mtp_cache = model.mtp.make_cache()
        self.step = decode_step(model)
        # Pairs the MTP has yet to take in: (hidden [1, n, H], the next tokens, the first position, or the
        # positions [3, 1, n] of a prompt chunk with media), and how many.
        self.backlog: list[tuple[mx.array, list[int], int | mx.array]] = []
        self.backlog_len = 0
        self.queue: list[int] = []  # tokens to return, in order
        self.unrecorded: list[int] = []  # fed to the main cache ahead of what was returned
        self.kept = 0  # tokens the last recorded forward kept
        self.last_was_fed = False  # the token returned last is the first of `unrecorded`
        self.pending: int | None = None  # the token returned last and not fed
        self.last_hidden: mx.array | None = None  # h_{P-1} [1, 1, H], paired with `pending` once it is sampled
        # Plain mode, where speculation does not pay: pipelined plain steps, the step feeding the token returned
        # last in flight (as `generator.PlainDecoder` runs them), their hidden states still going to the MTP.
        self.inflight: tuple[mx.array, mx.array, list[Any]] | None = None  # (hidden, logits, cache before it)
        self.depth_next: int | None = None  # the depth decided on leaving plain mode

    # --- the prompt -------------------------------------------------------------------------------------------

    def prompt_chunk(self, start: int, hidden: mx.array, tokens: list[int], position_ids: mx.array | None) -> None:
        """The main model's hidden states [1, L, H] of prompt positions start .. start+L-1, `tokens` the prompt
        from start+1 on (one fewer than L for the last chunk: its last state waits for the first sampled token)."""
        L = hidden.shape[1]
        n = min(L, len(tokens))
        if n:
            self._add(hidden[:, :n], tokens[:n], position_ids[..., :n] if position_ids is not None else start)
        if n < L:
            self.last_hidden = hidden[:, n:]

    def start(self, logits: mx.array, generated: list[int]) -> int:
        """The first token, from the prompt's last logits. The MTP takes in the prompt now, as part of the prefill
        (one layer more over the prompt), so that no round's draft carries it."""
        self.pending = int(self.sampler.sample(logits, generated).item())
        if self.backlog:
            self._catch_up()
        return self.pending

    # --- decoding ---------------------------------------------------------------------------------------------

    def next(self, generated: list[int]) -> int:
        """The next token after `generated` (every token this decoder returned, in order)."""
        if self.inflight is not None:
            self.pc.record([generated[-1]])  # its step, in flight, is now part of the conversation
            return self._plain_next(generated)
        if self.last_was_fed:  # the caller goes on past it: it is now part of the conversation
            self.pc.record([self.unrecorded.pop(0)])
        if not self.queue:
            depth = self.depth_next if self.depth_next is not None else self.controller.depth()
            self.depth_next = None
            if depth == 0 and not self.controller.measuring:
                return self._enter_plain(generated)
            self._round(generated, depth)
        token = self.queue.pop(0)
        self.last_was_fed = bool(self.queue)  # every queued token but the last (the bonus) is in the cache
        if not self.queue:
            self.pending = token
        return token

    def _enter_plain(self, generated: list[int]) -> int:
        t, P = self.pending, self.pc.cache[0].offset
        self.inflight = self._launch(mx.array([t]))
        self.pc.record([t])
        self._add(self.last_hidden, [t], P - 1)
        return self._plain_next(generated)

    def _plain_next(self, generated: list[int]) -> int:
        """A token from the step in flight; the step feeding it goes in flight before it is read back, unless the
        controller now wants to draft: the token is then returned unfed, for the next round."""
        hidden, logits, _ = self.inflight
        P = self.pc.cache[0].offset  # the step in flight fed position P - 1
        y = self.sampler.sample(logits, generated)
        self.stats.forwards += 1
        self.stats.tokens += 1
        depth = self.controller.depth()
        if depth:
            self.inflight, self.depth_next = None, depth
            self.last_hidden, self.pending = hidden, int(y.item())
            self.queue, self.last_was_fed = [], False
            return self.pending
        self.inflight = self._launch(y)
        token = int(y.item())
        self._add(hidden, [token], P - 1)
        return token

    def _launch(self, token: mx.array) -> tuple[mx.array, mx.array, list[Any]]:
        """Queue the compiled step feeding `token` [1] and return at once (atomic: on an interruption while the
        graph is built, the cache is put back)."""
        with atomic(self.pc.cache) as before:
            hidden = self.step.hidden(token.reshape(1, 1), self.pc.cache, self.rope_delta)
            logits = self.model.logits(hidden)[0, -1]
            mx.async_eval(hidden, logits, cache_buffers(self.pc.cache))
        return hidden, logits, before

    def close(self) -> None:
        """Drop from the main cache the fed tokens that were never returned as needed (see the class docstring)."""
        if self.inflight is not None:
            restore_cache(self.pc.cache, self.inflight[2])
            self.inflight = None
        if self.unrecorded:
            keep_tokens(self.pc.cache, self.kept, self.kept - len(self.unrecorded))
            self.unrecorded = []
        self.queue, self.last_was_fed = [], False

    def _round(self, generated: list[int], depth: int) -> None:
        t, P = self.pending, self.pc.cache[0].offset
        self._add(self.last_hidden, [t], P - 1)
        started = time.perf_counter()
        drafts, qs, gated = self._draft(depth, generated) if depth else ([], [], False)
        drafted = time.perf_counter()
        with atomic(self.pc.cache):
            hidden, bonus, accepted = self._verify(t, drafts, qs, generated)
        done = time.perf_counter()
        if depth:
            self.controller.observe_round(len(drafts), accepted, drafted - started, done - drafted,
                                          len(drafts) + gated, gated)
        if not drafts:
            self.controller.observe_plain(done - drafted)
        for j in range(len(drafts)):
            self.stats.drafted[j] += 1
            self.stats.accepted[j] += j < accepted
        self.stats.forwards += 1
        self.stats.tokens += accepted + 1
        self.pc.record([t])
        self.kept = accepted + 1
        self.unrecorded = drafts[:accepted]
        self.queue = drafts[:accepted] + [bonus]
        if accepted:
            self._add(hidden[:, :accepted], drafts[:accepted], P)
        self.last_hidden = hidden[:, accepted:accepted + 1]

    def _draft(self, depth: int, generated: list[int]) -> tuple[list[int], list[mx.array], bool]:
        """Up to `depth` drafts from the MTP, the distributions they were drawn from, and whether the gate stopped
        them."""
        model, mtp = self.model, self.model.mtp
        out = self._catch_up()
        valid = [c.offset for c in self.mtp_cache]
        position = self.pc.cache[0].offset  # of the pair (MTP output at P - 1, d_1)
        drafts: list[int] = []
        qs: list[mx.array] = []
        gated = False
        for j in range(depth):
            logits = model.logits(out)[0, -1]
            q = self.sampler.probabilities(logits, generated + drafts)
            token = mx.argmax(q) if self.sampler.params.greedy else self.sampler.draw(q)
            confidence = mx.softmax(logits.astype(mx.float32)).max() if self.sampler.params.greedy else q.max()
            mx.eval(token, confidence)
            if confidence.item() < CONFIDENCE_GATE:
                gated = True
                break
            drafts.append(int(token.item()))
            qs.append(q)
            if j + 1 < depth:
                out = mtp(out, model.model.embed_tokens(mx.array([[drafts[-1]]])), self.mtp_cache,
                          position_ids=self._positions(position + j, 1))
        for c, offset in zip(self.mtp_cache, valid):
            c.restore(offset)
        return drafts, qs, gated

    def _verify(self, t: int, drafts: list[int], qs: list[mx.array], generated: list[int]
                ) -> tuple[mx.array, int, int]:
        """Feed [t, drafts] to the main model; (its hidden states [1, m+1, H], the bonus token, drafts accepted)."""
        model, cache = self.model, self.pc.cache
        tokens = mx.array([[t, *drafts]])
        if not drafts:  # a plain step: the compiled decode step
            hidden = self.step.hidden(tokens, cache, self.rope_delta)
            bonus = self.sampler.sample(model.logits(hidden)[0, -1], generated)
            mx.eval(bonus, [c.state for c in cache])
            return hidden, int(bonus.item()), 0
        P = cache[0].offset
        positions = None if no_delta(self.rope_delta) else text_position_ids(P, len(drafts) + 1, self.rope_delta)
        with recording_steps(cache):
            hidden = model.model(tokens, cache, positions)
        logits = model.logits(hidden)[0]  # [m + 1, vocab]
        mx.eval(hidden, logits, [c.state for c in cache])
        accepted, bonus = accept(self.sampler, logits, drafts, qs, generated)
        keep_tokens(cache, len(drafts) + 1, accepted + 1)
        return hidden, bonus, accepted

    # --- the MTP cache ----------------------------------------------------------------------------------------

    def _add(self, hidden: mx.array, tokens: list[int], positions: int | mx.array) -> None:
        """Pairs for the MTP; taken in at the next draft, or once there are many (a long prompt, a long stretch of
        plain steps), so the backlog stays bounded."""
        self.backlog.append((hidden, tokens, positions))
        self.backlog_len += len(tokens)
        if self.inflight is not None:  # plain mode: the MTP's cache skips what lies far before the next probe
            while self.backlog_len - len(self.backlog[0][1]) >= PLAIN_WINDOW:
                self.backlog_len -= len(self.backlog.pop(0)[1])
        elif self.backlog_len >= CATCH_UP_CHUNK:
            self._catch_up()

    def _catch_up(self) -> mx.array:
        """Feed the backlog of (main hidden state, next token) pairs to the MTP; its output at the last [1, 1, H]."""
        hidden = mx.concatenate([h for h, _, _ in self.backlog], axis=1)
        tokens = mx.array([[t for _, ts, _ in self.backlog for t in ts]])
        positions = mx.concatenate([self._positions(p, len(ts)) if isinstance(p, int) else p
                                    for _, ts, p in self.backlog], axis=-1)
        self.backlog, self.backlog_len = [], 0
        out = self.model.mtp(hidden, self.model.model.embed_tokens(tokens), self.mtp_cache, position_ids=positions)
        mx.eval(out, [c.state for c in self.mtp_cache])
        return out[:, -1:]

    def _positions(self, start: int, length: int) -> mx.array:
        return text_position_ids(start, length, self.rope_delta)
