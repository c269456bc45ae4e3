"""Sampling: penalties, truncation, seeded reproducibility, empirical distribution, presets and config parsing."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen36.sampling import (
    PRESETS,
    Sampler,
    SamplingParams,
    apply_penalties,
    filter_logits,
    from_generation_config,
    preset,
)

QWEN36_GENERATION_CONFIG = {"bos_token_id": 248044, "do_sample": True, "eos_token_id": [248046, 248044],
                            "pad_token_id": 248044, "temperature": 1.0, "top_k": 20, "top_p": 0.95}


def as_list(x: mx.array) -> list[float]:
    return np.array(x).tolist()


def kept(x: mx.array) -> list[int]:
    return np.flatnonzero(np.isfinite(np.array(x))).tolist()


# --- greedy -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (1, 7)])
def test_greedy_picks_argmax(shape):
    logits = mx.array([0.1, -2.0, 3.5, 3.4, 0.0, -9.0, 1.0]).reshape(shape)
    assert Sampler(SamplingParams(temperature=0))(logits) == 2


def test_greedy_is_argmax_of_penalised_logits():
    logits = mx.array([0.0, 3.0, 2.0, 1.0])
    params = SamplingParams(temperature=0, presence_penalty=1.5)
    assert Sampler(params)(logits, [1]) == 2


def test_greedy_ignores_seed_and_truncation():
    logits = mx.array([1.0, 5.0, 2.0])
    for seed in range(5):
        assert Sampler(SamplingParams(temperature=0, top_k=2, top_p=0.5, seed=seed))(logits) == 1


# --- penalties --------------------------------------------------------------------------------------------------

LOGITS = [2.0, -1.0, 0.5, 4.0, -3.0, 0.0]


def test_presence_penalty_subtracts_once_per_seen_token():
    out = apply_penalties(mx.array(LOGITS), [0, 0, 0, 1], SamplingParams(presence_penalty=0.5))
    assert as_list(out) == pytest.approx([1.5, -1.5, 0.5, 4.0, -3.0, 0.0])


def test_frequency_penalty_scales_with_count():
    out = apply_penalties(mx.array(LOGITS), [0, 0, 0, 1], SamplingParams(frequency_penalty=0.5))
    assert as_list(out) == pytest.approx([0.5, -1.5, 0.5, 4.0, -3.0, 0.0])


def test_frequency_and_presence_add():
    params = SamplingParams(frequency_penalty=0.25, presence_penalty=1.0)
    out = apply_penalties(mx.array(LOGITS), [3, 3], params)
    assert as_list(out) == pytest.approx([2.0, -1.0, 0.5, 4.0 - 0.5 - 1.0, -3.0, 0.0])


def test_negative_penalties_encourage():
    out = apply_penalties(mx.array(LOGITS), [2, 2], SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5))
    assert as_list(out)[2] == pytest.approx(0.5 + 2.0 + 0.5)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = apply_penalties(mx.array(LOGITS), [0, 1, 0, 5], SamplingParams(repetition_penalty=2.0))
    # Once per token whatever the count; a zero logit stays zero.
    assert as_list(out) == pytest.approx([1.0, -2.0, 0.5, 4.0, -3.0, 0.0])


def test_repetition_window_excludes_old_tokens_but_presence_and_frequency_do_not():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5,
                            repetition_context_size=2)
    generated = [3, 0, 0, 1]  # token 3 is outside the last-2 window, token 0 straddles it
    out = apply_penalties(mx.array(LOGITS), generated, params)
    expected = [
        2.0 / 2 - 0.5 * 2 - 1.0,  # in window: repetition, then frequency (count 2) and presence
        -1.0 * 2 - 0.5 - 1.0,  # in window, negative: multiplied
        0.5,
        4.0 - 0.5 - 1.0,  # outside window: no repetition penalty, but frequency and presence
        -3.0,
        0.0,
    ]
    assert as_list(out) == pytest.approx(expected)


def test_repetition_window_none_uses_whole_history():
    params = SamplingParams(repetition_penalty=2.0, repetition_context_size=None)
    out = apply_penalties(mx.array(LOGITS), [3, 0, 1], params)
    assert as_list(out) == pytest.approx([1.0, -2.0, 0.5, 2.0, -3.0, 0.0])


def test_penalties_do_not_modify_callers_logits():
    logits = mx.array(LOGITS)
    apply_penalties(logits, [0, 1, 3], SamplingParams(repetition_penalty=2.0, presence_penalty=1.0))
    assert as_list(logits) == LOGITS


def test_sampler_incremental_counts_match_from_scratch():
    # The sampler counts incrementally (private _penalised); it must match a recount, also after switching history.
    params = SamplingParams(frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.5,
                            repetition_context_size=3)
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=32).astype(np.float32))
    sampler = Sampler(params)
    histories = [rng.integers(0, 32, size=n).tolist() for n in (5, 6, 9, 12, 2, 2)]
    histories[1][:5] = histories[0]  # extends the first: the incremental path
    histories[3][8] = (histories[2][8] + 1) % 32  # longer, but the last counted token changed: recount
    histories[5][1] = histories[4][1]  # same length and last token: only reset() tells a new sequence apart
    for i, h in enumerate(histories):
        if i == 5:
            sampler.reset()
        expected = np.array(apply_penalties(logits, h, params))
        assert np.array(sampler._penalised(logits, h)) == pytest.approx(expected)


def test_sampler_repetition_window():
    # Only the last token (0) is in the window: 3 -> 0.75 < 2. Penalising the whole history would leave 0 on top.
    params = SamplingParams(temperature=0, repetition_penalty=4.0, repetition_context_size=1)
    assert Sampler(params)(mx.array([3.0, 2.0]), [1, 0]) == 1
    assert Sampler(replace(params, repetition_context_size=None))(mx.array([3.0, 2.0]), [1, 0]) == 0


def test_sampler_penalties_apply_in_sampled_mode():
    # Unpenalised, token 2 has p = 0.995; ten repeats at frequency_penalty 2 take its logit to -14 (p ~ 1e-6).
    logits = mx.array([0.0, 0.0, 6.0])
    params = SamplingParams(frequency_penalty=2.0)
    assert {Sampler(replace(params, seed=s))(logits, [2] * 10) for s in range(50)} == {0, 1}


def test_out_of_vocabulary_history_is_an_error():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_penalties(mx.array(LOGITS), [6], SamplingParams(presence_penalty=1.0))


# --- truncation -------------------------------------------------------------------------------------------------

PROBS = np.array([0.05, 0.4, 0.1, 0.25, 0.2])  # descending: 1, 3, 4, 2, 0
PLOGITS = mx.array(np.log(PROBS).astype(np.float32))


@pytest.mark.parametrize(("k", "support"), [(1, [1]), (2, [1, 3]), (3, [1, 3, 4]), (0, [0, 1, 2, 3, 4]),
                                            (5, [0, 1, 2, 3, 4]), (99, [0, 1, 2, 3, 4])])
def test_top_k_support(k, support):
    assert kept(filter_logits(PLOGITS, SamplingParams(top_k=k))) == support


@pytest.mark.parametrize(("p", "support"), [(0.1, [1]), (0.39, [1]), (0.5, [1, 3]), (0.64, [1, 3]),
                                            (0.66, [1, 3, 4]), (0.9, [1, 2, 3, 4]), (0.96, [0, 1, 2, 3, 4]),
                                            (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_smallest_set_reaching_p(p, support):
    assert kept(filter_logits(PLOGITS, SamplingParams(top_p=p))) == support


def test_top_p_stops_as_soon_as_mass_is_reached():
    # Four equal tokens have exactly representable cumulative mass: .25, .5, .75, 1; top_p .5 needs two.
    assert len(kept(filter_logits(mx.zeros((4,)), SamplingParams(top_p=0.5)))) == 2
    assert len(kept(filter_logits(mx.zeros((4,)), SamplingParams(top_p=0.25)))) == 1


def test_top_p_applies_to_top_k_survivors():
    # Among the top 2 (0.4, 0.25) renormalised: 0.615, 0.385, so top_p 0.6 keeps one token and 0.62 two.
    assert kept(filter_logits(PLOGITS, SamplingParams(top_k=2, top_p=0.6))) == [1]
    assert kept(filter_logits(PLOGITS, SamplingParams(top_k=2, top_p=0.62))) == [1, 3]


@pytest.mark.parametrize(("m", "support"), [(0.0, [0, 1, 2, 3, 4]), (0.2, [1, 2, 3, 4]), (0.3, [1, 3, 4]),
                                            (0.55, [1, 3]), (0.7, [1]), (1.0, [1])])
def test_min_p_drops_tokens_below_fraction_of_max(m, support):
    assert kept(filter_logits(PLOGITS, SamplingParams(min_p=m))) == support


def test_temperature_scales_and_changes_top_p_support():
    out = filter_logits(mx.array([2.0, 1.0, 0.0]), SamplingParams(temperature=0.5))
    assert as_list(out) == pytest.approx([4.0, 2.0, 0.0])
    # At T=1 probs are .665/.245/.09: top_p .8 keeps two; at T=0.25 the first has .98 and keeps alone.
    assert kept(filter_logits(mx.array([2.0, 1.0, 0.0]), SamplingParams(top_p=0.8))) == [0, 1]
    assert kept(filter_logits(mx.array([2.0, 1.0, 0.0]), SamplingParams(top_p=0.8, temperature=0.25))) == [0]


def test_filtered_values_are_unchanged_survivors():
    out = np.array(filter_logits(PLOGITS, SamplingParams(top_k=3, top_p=0.9, min_p=0.1)))
    assert out[[1, 3, 4]] == pytest.approx(np.log(PROBS[[1, 3, 4]]))


def test_sampled_support_matches_filter():
    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(size=64).astype(np.float32) * 2)
    for params in (SamplingParams(top_k=5), SamplingParams(top_p=0.5), SamplingParams(min_p=0.3),
                   SamplingParams(top_k=10, top_p=0.8, min_p=0.05, temperature=0.7)):
        support = set(kept(filter_logits(logits, params)))
        draws = {Sampler(replace(params, seed=s))(logits) for s in range(300)}
        assert draws <= support
        assert len(draws) >= min(len(support), 2)


# --- PRNG -------------------------------------------------------------------------------------------------------

def _sequence(seed: int | None, n: int = 32) -> list[int]:
    sampler = Sampler(SamplingParams(seed=seed))
    logits = mx.zeros((1000,))
    return [sampler(logits) for _ in range(n)]


def test_same_seed_same_sequence():
    assert _sequence(7) == _sequence(7)


def test_different_seed_different_sequence():
    assert _sequence(7) != _sequence(8)


def test_key_advances_per_step():
    assert len(set(_sequence(3))) > 20


def test_reset_rewinds_the_key():
    sampler = Sampler(SamplingParams(seed=5))
    logits = mx.zeros((1000,))
    first = [sampler(logits) for _ in range(8)]
    sampler.reset()
    assert [sampler(logits) for _ in range(8)] == first


def test_seeded_sampler_ignores_global_prng():
    mx.random.seed(1)
    a = _sequence(11, 8)
    mx.random.seed(2)
    assert _sequence(11, 8) == a


def test_unseeded_sampler_uses_global_prng():
    mx.random.seed(1)
    a = _sequence(None, 8)
    mx.random.seed(1)
    assert _sequence(None, 8) == a


def test_sample_returns_lazy_array_of_token():
    out = Sampler(SamplingParams(top_k=3, seed=0)).sample(PLOGITS)
    assert isinstance(out, mx.array) and out.ndim == 0 and int(out.item()) in (1, 3, 4)


def test_empirical_distribution_matches_softmax():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    sampler = Sampler(SamplingParams(seed=1234))
    logits = mx.array(np.log(probs).astype(np.float32) + 3.0)  # an offset must not matter
    n = 4000
    counts = np.bincount([sampler(logits) for _ in range(n)], minlength=4)
    chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert chi2 < 16.3, (counts, chi2)  # 3 dof, p = 0.001


def test_empirical_distribution_respects_temperature():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    sampler = Sampler(SamplingParams(temperature=0.5, seed=99))
    n = 4000
    counts = np.bincount([sampler(mx.array(np.log(probs).astype(np.float32))) for _ in range(n)], minlength=4)
    expected = probs**2 / (probs**2).sum()
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 16.3, (counts, chi2)


# --- presets and generation_config ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "values"), [
    ("thinking-general", (1.0, 0.95, 20, 0.0, 1.5, 0.0, 1.0)),
    ("thinking-coding", (0.6, 0.95, 20, 0.0, 0.0, 0.0, 1.0)),
    ("instruct", (0.7, 0.80, 20, 0.0, 1.5, 0.0, 1.0)),
])
def test_presets_match_model_card(name, values):
    p = preset(name)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.presence_penalty, p.frequency_penalty,
            p.repetition_penalty) == values
    assert p.seed is None and PRESETS[name] is p


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="thinking-general, thinking-coding, instruct"):
        preset("creative")


def test_from_qwen36_generation_config():
    p = from_generation_config(QWEN36_GENERATION_CONFIG)
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 0.95, 20)
    assert (p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 0.0, 1.0)
    assert not p.greedy


def test_from_generation_config_do_sample_false_is_greedy():
    assert from_generation_config({**QWEN36_GENERATION_CONFIG, "do_sample": False}).greedy


def test_from_generation_config_optional_keys():
    config = {"temperature": 0.6, "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5,
              "top_k": None}
    p = from_generation_config(config)
    assert (p.temperature, p.min_p, p.repetition_penalty, p.presence_penalty, p.top_k) == (0.6, 0.05, 1.1, 0.5, 0)


def test_from_generation_config_file_and_directory(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN36_GENERATION_CONFIG))
    assert from_generation_config(tmp_path) == from_generation_config(QWEN36_GENERATION_CONFIG)
    assert from_generation_config(str(tmp_path / "generation_config.json")).top_p == 0.95


def test_from_generation_config_validates():
    with pytest.raises(ValueError, match="top_p"):
        from_generation_config({"top_p": 1.5})


# --- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "name"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_context_size": 0}, "repetition_context_size"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.0}, "seed"),
])
def test_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_replace_revalidates():
    with pytest.raises(ValueError, match="top_k"):
        replace(preset("instruct"), top_k=-5)


def test_bad_logits_shape():
    with pytest.raises(ValueError, match="logits"):
        Sampler()(mx.zeros((2, 4)))
