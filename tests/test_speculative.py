"""Speculative decoding with the MTP head: greedy output identical to plain decoding (every draft rejected, every
draft accepted, adaptive depth; MoE and dense; across turns on one prompt cache, thinking on and off), rollback
leaving the cache as plain decoding leaves it, rejection sampling preserving the target distribution, the depth
controller, and the errors."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_qwen36.speculative as spec
from mlx_qwen36 import generate, load, make_prompt_cache, stream_generate, synthetic
from mlx_qwen36.cache import KVCache
from mlx_qwen36.sampling import Sampler, SamplingParams

PROMPT = "Tell me something about the sea."


@pytest.fixture(scope="module", params=["moe", "dense"])
def checkpoint(request, mtp_chat_dir, tmp_path_factory, shared_dir):
    if request.param == "moe":
        return mtp_chat_dir
    from tokenizer_fixture import write_chat_checkpoint

    return write_chat_checkpoint(tmp_path_factory.mktemp("spec-dense") / "m", shared_dir, mtp_num_hidden_layers=1,
                                 num_experts=0, intermediate_size=64)


def markov(path, perfect_mtp=True):
    """The model with every mixer and FFN output zeroed: each hidden state is its token's normed embedding, so the
    next token's distribution depends on the current token only; with `perfect_mtp` the MTP head computes the same
    from the next token's embedding."""
    model, processor = load(path, mtp=True, lazy=True)

    def rule(name, w):
        if name.startswith("mtp.") and not perfect_mtp:
            return w
        if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
            return mx.zeros_like(w)
        if name == "mtp.fc.weight":
            H = w.shape[0]
            return mx.concatenate([mx.eye(H), mx.zeros((H, H))], axis=1).astype(w.dtype)
        if name in ("model.norm.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight"):
            return mx.ones_like(w)
        return w

    model.update(tree_unflatten([(k, rule(k, w)) for k, w in tree_flatten(model.parameters())]))
    mx.eval(model.parameters())
    return model, processor


def perfect(path):
    """A model whose MTP drafts are always right (see `markov`)."""
    return markov(path)


@pytest.fixture
def fixed_depth(monkeypatch):
    """Every round drafts as deep as allowed and no draft is gated (the controller and gate tested apart)."""
    monkeypatch.setattr(spec.DepthController, "depth", lambda self: self.max_depth)
    monkeypatch.setattr(spec, "CONFIDENCE_GATE", 0.0)


def conversation(model, processor, draft_tokens, turns=2, enable_thinking=True, max_tokens=12):
    """Greedy replies of a few turns on one prompt cache: the tokens of each reply, and the final cache check."""
    pc = make_prompt_cache(model)
    messages, replies = [], []
    for i in range(turns):
        messages.append({"role": "user", "content": f"{PROMPT} Turn {i}."})
        r = generate(model, processor, messages, max_tokens=max_tokens, temperature=0, prompt_cache=pc,
                     enable_thinking=enable_thinking, draft_tokens=draft_tokens)
        replies.append(r.tokens)
        messages.append({"role": "assistant", "content": r.content, "reasoning_content": r.reasoning})
        assert all(c.offset == len(pc.tokens) for c in pc.cache)
    return replies, r


@pytest.mark.parametrize("draft_tokens", [1, 2, 4])
def test_greedy_identical_when_every_draft_is_rejected(checkpoint, fixed_depth, draft_tokens):
    model, processor = load(checkpoint, mtp=True)
    want, _ = conversation(model, processor, None)
    got, last = conversation(model, processor, draft_tokens)
    assert got == want
    assert last.tokens_per_forward < 1.5 and last.draft_acceptance[0] < 0.5  # random MTP weights: rejections


@pytest.mark.parametrize("draft_tokens", [1, 3, 4])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_greedy_identical_when_every_draft_is_accepted(checkpoint, fixed_depth, draft_tokens, enable_thinking):
    model, processor = perfect(checkpoint)
    want, _ = conversation(model, processor, None, enable_thinking=enable_thinking, max_tokens=20)
    got, last = conversation(model, processor, draft_tokens, enable_thinking=enable_thinking, max_tokens=20)
    assert got == want
    assert last.draft_acceptance[:draft_tokens] == [1.0] * draft_tokens
    assert last.tokens_per_forward > 0.8 * (draft_tokens + 1)  # whole rounds but the last


def test_greedy_identical_with_the_adaptive_depth(checkpoint):
    for model, processor in (load(checkpoint, mtp=True), perfect(checkpoint)):
        want, _ = conversation(model, processor, None, max_tokens=24)
        got, _ = conversation(model, processor, "auto", max_tokens=24)
        assert got == want


def test_stopping_inside_a_round_leaves_the_cache_as_plain_decoding(checkpoint, fixed_depth):
    """A reply cut by max_tokens in the middle of accepted drafts: the cache holds the prompt and every token but
    the last, and the next turn continues exactly as after plain decoding."""
    model, processor = perfect(checkpoint)
    for n in (1, 2, 3, 6):
        want, _ = conversation(model, processor, None, max_tokens=n)
        got, _ = conversation(model, processor, 4, max_tokens=n)
        assert got == want


def test_interrupted_verification_leaves_a_consistent_cache(checkpoint, fixed_depth, monkeypatch):
    model, processor = perfect(checkpoint)
    pc = make_prompt_cache(model)
    real = KVCache.update
    calls = []

    def update(self, keys, values):
        if any(self is c for c in pc.cache) and keys.shape[2] > 1 and len(pc.tokens) > 20:  # a verify, mid-model
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(self, keys, values)

    monkeypatch.setattr(KVCache, "update", update)
    with pytest.raises(KeyboardInterrupt):
        for _ in stream_generate(model, processor, PROMPT, max_tokens=30, temperature=0, prompt_cache=pc,
                                 draft_tokens=3):
            pass
    monkeypatch.undo()
    assert len(calls) == 2
    assert all(c.offset == len(pc.tokens) for c in pc.cache)
    want = generate(model, processor, PROMPT + " Again.", max_tokens=8, temperature=0)
    got = generate(model, processor, PROMPT + " Again.", max_tokens=8, temperature=0, prompt_cache=pc)
    assert got.tokens == want.tokens


def test_sampling_runs_and_reports_statistics(checkpoint):
    model, processor = perfect(checkpoint)
    r = generate(model, processor, PROMPT, max_tokens=16, temperature=0.8, top_p=0.9, seed=3, draft_tokens=2)
    assert len(r.tokens) == 16 or r.finish_reason == "stop"
    assert len(r.draft_acceptance) == spec.MAX_DEPTH and r.tokens_per_forward >= 1.0


# --- rejection sampling -------------------------------------------------------------------------------------------


def test_sampled_tokens_keep_the_models_distribution(checkpoint, fixed_depth):
    """End to end on a tiny model whose next-token distribution p(b | a) depends on the current token only, with a
    random MTP head (its drafts mostly rejected, so the residual distribution is what gets sampled): over many
    seeds, the pairs (first token a, second token b) occur as often as count(a) * p(b | a) predicts (chi-square at
    the 0.1% level)."""
    model, processor = markov(checkpoint, perfect_mtp=False)
    params = {"temperature": 1.0, "top_k": 4, "max_tokens": 2, "draft_tokens": 1, "enable_thinking": False}
    pairs = {}
    for seed in range(300):
        r = generate(model, processor, PROMPT, seed=seed, **params)
        pairs[tuple(r.tokens)] = pairs.get(tuple(r.tokens), 0) + 1
    firsts = sorted({a for a, _ in pairs})
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=4))
    observed, expected = [], []
    for a in firsts:
        n_a = sum(n for (x, _), n in pairs.items() if x == a)
        p = np.array(sampler.probabilities(model.logits(model.model(mx.array([[a]])))[0, -1]))
        for b in np.flatnonzero(p):
            observed.append(pairs.get((a, int(b)), 0))
            expected.append(n_a * p[b])
    assert sum(observed) == 300  # no pair outside the model's support
    observed, expected = np.array(observed), np.array(expected)
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = len(expected) - len(firsts)
    assert stat < chi2_999(dof), (stat, dof)


def chi2_999(dof: int) -> float:
    """The chi-square distribution's 99.9% quantile (Wilson-Hilferty: within 2% for dof >= 3)."""
    z, k = 3.0902, float(dof)
    return k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3



@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=1),
                                    SamplingParams(temperature=0.7, top_p=0.8, seed=2)])
def test_rejection_sampling_keeps_the_target_distribution(params):
    """Drafts drawn from a q far from the target p: the first token's frequencies over many rounds match p (a
    chi-square test at the 0.1% level), and so do the second's in the rounds that accepted the first draft."""
    V, trials = 6, 3000
    rng = np.random.default_rng(0)
    target = mx.array(rng.normal(size=(3, V)) * 1.5, dtype=mx.float32)  # main-model logits of positions 0, 1, 2
    draft = mx.array(rng.normal(size=(2, V)) * 1.5, dtype=mx.float32)
    sampler = Sampler(params)
    q = [sampler.probabilities(draft[j]) for j in range(2)]
    p = [np.array(sampler.probabilities(target[j])) for j in range(2)]
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(trials):
        drafts = [int(sampler.draw(q[j]).item()) for j in range(2)]
        accepted, bonus = spec.accept(sampler, target, drafts, q, [])
        out = drafts[:accepted] + [bonus]
        first[out[0]] += 1
        if accepted >= 1:
            second[out[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        expected = probs * counts.sum()
        keep = expected > 0
        assert counts[~keep].sum() == 0  # nothing outside the target's support
        chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
        assert chi2 < chi2_999(keep.sum() - 1), (chi2, counts, expected)


def test_greedy_acceptance_is_the_longest_matching_prefix():
    target = mx.array(np.eye(5, dtype=np.float32)[[1, 2, 4, 0]] * 5)  # argmax 1, 2, 4, 0
    greedy = Sampler(SamplingParams(temperature=0))
    one_hot = [mx.zeros(5)] * 3
    assert spec.accept(greedy, target, [1, 2, 3], one_hot, []) == (2, 4)
    assert spec.accept(greedy, target, [1, 2, 4], one_hot, []) == (3, 0)
    assert spec.accept(greedy, target, [3, 2, 4], one_hot, []) == (0, 1)


# --- the depth controller -----------------------------------------------------------------------------------------


def test_depth_follows_acceptance_and_cost():
    c = spec.DepthController(4)
    assert c.depth() == 0 and c.measuring  # first two plain steps, to measure them (the faster counts)
    c.observe_plain(3.0)
    assert c.depth() == 0
    c.observe_plain(1.0)
    assert c.step_s == 1.0
    assert c.depth() == 1 and c.measuring  # then one draft, to measure drafting and verifying
    for _ in range(30):
        c.observe_round(2, 2, 0.2, 1.2, 2, False)  # every draft accepted, cheap drafts, verifies near a plain step
    assert not c.measuring and c.depth() == 4
    for _ in range(30):
        c.observe_round(1, 0, 0.1, 1.2, 1, False)  # nothing accepted
    assert c.depth() == 0
    depths = [c.depth() for _ in range(7 * spec.PROBE_EVERY)]  # probed again now and then, less and less often
    probes = [i + 1 for i, d in enumerate(depths) if d == 1]
    assert set(depths) == {0, 1} and np.diff(probes).tolist() == [2 * spec.PROBE_EVERY, 4 * spec.PROBE_EVERY]


def test_depth_stops_where_drafts_cost_more_than_they_bring():
    c = spec.DepthController(3)
    c.observe_plain(1.0)
    c.observe_plain(1.0)
    for _ in range(30):
        c.observe_round(1, 1, 0.8, 1.5, 1, False)  # always accepted, but a draft costs most of a step
    assert c.depth() == 0


def test_a_gate_that_always_stops_drafting_turns_speculation_off():
    c = spec.DepthController(3)
    c.observe_plain(1.0)
    c.observe_plain(1.0)
    for _ in range(30):
        c.observe_round(0, 0, 0.1, 1.0, 1, True)  # the MTP is never confident: one step paid, nothing drafted
    assert not c.measuring and c.depth() == 0


def test_the_controller_is_kept_across_generations(checkpoint):
    model, processor = load(checkpoint, mtp=True)
    generate(model, processor, PROMPT, max_tokens=6, temperature=0, draft_tokens=2)
    kept = spec.controller(model, 2)
    assert kept.plain_seen >= 1  # the first generation measured a plain step
    assert spec.controller(model, 2) is kept and spec.controller(model, 3) is not kept


def test_fixed_depth_without_adaptation():
    assert spec.DepthController(3, adaptive=False).depth() == 3


# --- errors ---------------------------------------------------------------------------------------------------


def test_draft_tokens_needs_the_mtp_head_and_a_valid_value(checkpoint):
    model, processor = load(checkpoint)
    assert "mtp" not in model
    with pytest.raises(ValueError, match="mtp=True"):
        next(stream_generate(model, processor, PROMPT, draft_tokens=2))
    for bad in (5, -1, "many", 1.5, True):
        with pytest.raises(ValueError, match="draft_tokens"):
            spec.parse_draft_tokens(bad)
    assert spec.parse_draft_tokens("auto") == spec.AUTO_DEPTH and spec.parse_draft_tokens(0) is None


# --- images, and the command lines ----------------------------------------------------------------------------


def test_greedy_identical_after_an_image(tmp_path_factory, shared_dir, fixed_depth):
    """Text after an image sits at M-RoPE positions shifted by the image: drafts, verification and the MTP's
    positions follow them."""
    from PIL import Image
    from tokenizer_fixture import qwen36_processor_dir_or_skip

    out = tmp_path_factory.mktemp("spec-vl") / "m"
    text = synthetic.text_config("tiny", vocab_size=248320, mtp_num_hidden_layers=1)
    synthetic.write_checkpoint(out, text, dtype=mx.float32,
                               vision=synthetic.vision_config("tiny", text["hidden_size"]))
    for f in qwen36_processor_dir_or_skip(shared_dir).iterdir():
        shutil.copy(f, out / f.name)
    picture = out / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(picture)
    model, processor = load(out, mtp=True)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(picture)}},
                                             {"type": "text", "text": "What is this?"}]}]
    want = generate(model, processor, messages, max_tokens=10, temperature=0)
    got = generate(model, processor, messages, max_tokens=10, temperature=0, draft_tokens=3)
    assert got.tokens == want.tokens


def test_command_lines_take_mtp(checkpoint, capsys):
    import importlib

    from mlx_qwen36 import chat

    cli = importlib.import_module("mlx_qwen36.generate")
    args = ["--model", str(checkpoint), "--prompt", PROMPT, "--temp", "0", "--max-tokens", "8", "--no-think"]
    assert cli.main(args) == 0
    plain = capsys.readouterr()
    assert cli.main([*args, "--mtp", "2"]) == 0
    with_mtp = capsys.readouterr()
    assert with_mtp.out == plain.out
    assert "MTP:" in with_mtp.err and "tokens per forward" in with_mtp.err and "MTP:" not in plain.err
    assert chat.parser().parse_args(["--mtp"]).mtp == "auto"
    assert chat.parser().parse_args(["--mtp", "3"]).mtp == 3
    assert chat.parser().parse_args([]).mtp is None
    with pytest.raises(SystemExit):
        chat.parser().parse_args(["--mtp", "9"])
    assert "argument --mtp: expected 1-4 or auto, got 9" in capsys.readouterr().err
