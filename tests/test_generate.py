"""The streaming generator: reference greedy tokens, streaming phases and tool calls, stopping, prompt-cache reuse
equal to a full recompute, saving caches, and interruption safety."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from scripted import Scripted

import mlx_qwen36.generator as gen
from mlx_qwen36 import generate, load_model, make_prompt_cache, stream_generate
from mlx_qwen36.cache import KVCache
from mlx_qwen36.processor import load_processor
from mlx_qwen36.prompt_cache import PromptCache, PromptCacheError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load_model(chat_dir), load_processor(chat_dir)


@pytest.fixture(scope="module")
def reference_chat(tiny, chat):
    """The transformers-built tiny model (vocab 512) with the real processor, for raw-token-id prompts."""
    return load_model(tiny["moe"]["hf"]), chat[1]


def test_greedy_equals_reference(reference_chat, tiny):
    model, processor = reference_chat
    g = tiny["moe"]["golden"]
    prompt = [int(t) for t in g["input_ids"][0]]
    tokens = [c.token for c in stream_generate(model, processor, prompt, max_tokens=16, temperature=0)
              if c.token is not None]
    assert tokens == g["greedy_fp32"].tolist()


def test_stream_phases_tool_call_and_finish(chat):
    model, processor = chat
    text = ("Let me check 天气 🌦.</think>\n\nI'll look it up.\n\n<tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    script = processor.encode(text) + [processor.token_id("<|im_end|>")]
    chunks = list(stream_generate(Scripted(model, script), processor, "Weather in Paris?", tools=TOOLS,
                                  max_tokens=200, temperature=0))
    assert chunks[0].phase == "reasoning"
    assert "".join(c.text for c in chunks if c.phase == "reasoning") == "Let me check 天气 🌦."
    assert "".join(c.text for c in chunks if c.phase == "content") == "I'll look it up.\n\n"
    calls = [call for c in chunks for call in c.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris", "days": 3})]
    assert all("\ufffd" not in c.text and "<" not in c.text for c in chunks)
    assert [c.token for c in chunks if c.token is not None] == script
    assert chunks[-1].finish_reason == "tool_calls"
    assert chunks[-1].generation_tokens == len(script)


def test_generate_collects_the_result(chat):
    model, processor = chat
    script = processor.encode("hmm</think>\n\nHello! 你好") + [processor.token_id("<|im_end|>")]
    r = generate(Scripted(model, script), processor, "hi", temperature=0)
    assert (r.reasoning, r.content, r.finish_reason) == ("hmm", "Hello! 你好", "stop")
    assert r.prompt_tokens > 0 and r.tool_calls == []


def test_thinking_off_starts_in_content(chat):
    model, processor = chat
    script = processor.encode("Direct answer.") + [processor.token_id("<|im_end|>")]
    r = generate(Scripted(model, script), processor, "hi", enable_thinking=False, temperature=0)
    assert (r.reasoning, r.content) == ("", "Direct answer.")


def test_stop_strings_are_never_emitted(chat):
    model, processor = chat
    script = processor.encode("</think>\n\nalpha beta STOP gamma") + [processor.token_id("<|im_end|>")]
    r = generate(Scripted(model, script), processor, "hi", stop=["STOP", "never"], temperature=0)
    assert r.content == "alpha beta " and r.finish_reason == "stop"


def test_max_tokens_is_a_length_finish(chat):
    model, processor = chat
    r = generate(model, processor, "hi", max_tokens=5, temperature=0)
    assert len(r.tokens) == 5 and r.finish_reason == "length"


def test_prompt_longer_than_context_is_refused(reference_chat):
    model, processor = reference_chat
    with pytest.raises(ValueError, match="the prompt has 5000 tokens; the model's context is 4096"):
        next(stream_generate(model, processor, [5] * 5000))


def test_token_ids_outside_the_vocabulary_are_refused(reference_chat):
    model, processor = reference_chat
    with pytest.raises(ValueError, match="token id 248045 is outside the model's vocabulary of 512"):
        next(stream_generate(model, processor, "Hi"))


def test_seeded_sampling_is_reproducible(chat):
    model, processor = chat
    a = generate(model, processor, "hi", max_tokens=8, temperature=1.0, seed=7).tokens
    b = generate(model, processor, "hi", max_tokens=8, temperature=1.0, seed=7).tokens
    c = generate(model, processor, "hi", max_tokens=8, temperature=1.0, seed=8).tokens
    assert a == b and a != c


def conversation(first: gen.GenerationResult) -> list[dict]:
    return [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": first.content, "reasoning_content": first.reasoning},
            {"role": "user", "content": "Tell me more"}]


def last_logits(model, processor, messages, pc: PromptCache, **kw) -> tuple[np.ndarray, int]:
    ids, _ = gen.build_prompt(processor, messages, None, True, kw.get("preserve_thinking", False))
    cached = pc.reuse(model, ids)
    return np.array(gen.prefill(model, pc, ids, cached, 4)), cached


@pytest.mark.parametrize("preserve", [False, True])
def test_prompt_cache_reuse_equals_full_recompute(chat, preserve):
    model, processor = chat
    pc = make_prompt_cache(model)
    first = generate(model, processor, [{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
                     prompt_cache=pc, preserve_thinking=preserve)
    turn1 = first.prompt_tokens + len(first.tokens) - 1
    reused, cached = last_logits(model, processor, conversation(first), pc, preserve_thinking=preserve)
    fresh, none = last_logits(model, processor, conversation(first), make_prompt_cache(model),
                              preserve_thinking=preserve)
    assert none == 0 and cached > 0
    assert np.abs(reused - fresh).max() <= 1e-5
    if preserve:
        assert cached >= turn1  # the whole previous turn, reasoning included
    else:
        assert cached < first.prompt_tokens  # up to the last assistant turn, whose reasoning is dropped


def test_cached_tokens_are_reported(chat):
    model, processor = chat
    pc = make_prompt_cache(model)
    first = generate(model, processor, "Hi", max_tokens=4, temperature=0, prompt_cache=pc)
    second = generate(model, processor, conversation(first), max_tokens=4, temperature=0, prompt_cache=pc)
    assert first.cached_tokens == 0 and 0 < second.cached_tokens < second.prompt_tokens


def test_save_and_load_prompt_cache(chat, tiny, tmp_path):
    model, processor = chat
    pc = make_prompt_cache(model)
    first = generate(model, processor, "Hi", max_tokens=4, temperature=0, prompt_cache=pc)
    pc.save(tmp_path / "cache.safetensors")
    loaded = PromptCache.load(model, tmp_path / "cache.safetensors")
    assert loaded.tokens == pc.tokens
    messages = conversation(first)
    a, ca = last_logits(model, processor, messages, pc)
    b, cb = last_logits(model, processor, messages, loaded)
    assert ca == cb and np.abs(a - b).max() <= 1e-6
    other = load_model(tiny["dense"]["hf"])
    with pytest.raises(PromptCacheError, match="another model"):
        PromptCache.load(other, tmp_path / "cache.safetensors")
    with pytest.raises(PromptCacheError, match="another model"):
        loaded.reuse(other, [1, 2, 3])
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(PromptCacheError, match="not a readable prompt cache"):
        PromptCache.load(model, tmp_path / "junk.safetensors")


@pytest.mark.parametrize("compiled", [False, True])
def test_interrupted_generation_leaves_a_consistent_cache(chat, monkeypatch, compiled):
    """Ctrl-C while the third decode step is being built (midway through its layers: GDN layers 0-2 updated,
    attention layer 3 not), with the step before it still in flight."""
    model, processor = chat
    pc = make_prompt_cache(model)
    real_launch = gen._launch_step
    launches = []

    def interrupting(*args, **kwargs):
        launches.append(1)
        if len(launches) == 3:
            def boom(*a, **k):
                raise KeyboardInterrupt

            monkeypatch.setattr(KVCache, "update", boom)
            try:
                return real_launch(*args, **kwargs)
            finally:
                monkeypatch.undo()
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(gen, "_launch_step", interrupting)
    if not compiled:
        monkeypatch.setattr(gen, "decode_step", lambda model: None)
    with pytest.raises(KeyboardInterrupt):
        for _ in stream_generate(model, processor, "Hi", max_tokens=10, temperature=0, prompt_cache=pc):
            pass
    monkeypatch.undo()
    assert len(launches) == 3
    assert all(c.offset == len(pc.tokens) for c in pc.cache)
    reused, _ = last_logits(model, processor, "Hi again", pc)
    fresh, _ = last_logits(model, processor, "Hi again", make_prompt_cache(model))
    assert np.abs(reused - fresh).max() <= 1e-5


def test_decode_overlaps_the_next_step_with_one_sync_per_token(chat, monkeypatch):
    """Each token's step is queued (async_eval) before the token is read back; the only host syncs of the decode
    loop are the token reads, one per token; the stream equals the plain, synchronous decode."""
    model, processor = chat
    want = generate(model, processor, "Hi", max_tokens=8, temperature=0).tokens
    events = []
    real_async, real_eval, real_item = mx.async_eval, mx.eval, mx.array.item
    monkeypatch.setattr(gen.mx, "async_eval", lambda *a: events.append("launch") or real_async(*a))
    monkeypatch.setattr(gen.mx, "eval", lambda *a: events.append("eval") or real_eval(*a))
    monkeypatch.setattr(mx.array, "item", lambda self: events.append("item") or real_item(self))
    got = generate(model, processor, "Hi", max_tokens=8, temperature=0).tokens
    monkeypatch.undo()
    assert got == want
    decode = events[events.index("launch"):]
    assert decode.count("item") == len(got) and "eval" not in decode
    assert decode[:2] == ["launch", "item"]  # the step feeding a token is queued before it is read


def test_prefill_chunks_end_on_message_boundaries(chat, monkeypatch):
    model, processor = chat
    seen = []
    real = gen._atomic_step
    monkeypatch.setattr(gen, "_atomic_step", lambda m, pc, tokens, *a, **k: seen.append(list(tokens)) or
                        real(m, pc, tokens, *a, **k))
    messages = [{"role": "system", "content": "Be brief and helpful to the user."},
                {"role": "user", "content": "Hello there, how are you today?"}]
    ids, _ = gen.build_prompt(processor, messages, None, True, False)
    pc = make_prompt_cache(model)
    gen.prefill(model, pc, ids, 0, chunk_size=5)
    assert max(len(s) for s in seen) <= 5
    starts = np.cumsum([0] + [len(s) for s in seen])[:-1]
    im_start = [i for i, t in enumerate(ids) if t == processor.token_id("<|im_start|>")]
    assert set(im_start) <= set(starts.tolist())
    assert set(im_start[1:]) <= set(pc.snapshots)


def test_generation_wires_the_weights_on_a_metal_gpu(chat, monkeypatch, caplog):
    """As mlx-lm: the wired limit is raised to the GPU's recommended working set while generating, and put back."""
    model, processor = chat
    limits = []
    monkeypatch.setattr(gen.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(gen.mx, "device_info", lambda: {"max_recommended_working_set_size": 1 << 20})
    monkeypatch.setattr(gen.mx, "set_wired_limit", lambda n: limits.append(n) or 7)
    stream = stream_generate(model, processor, "Hi", max_tokens=3, temperature=0)
    next(stream)
    assert limits == [1 << 20]  # wired while tokens are being generated
    for _ in stream:
        pass
    assert limits == [1 << 20, 7]
    assert "can keep resident" in caplog.text  # the tiny model's 0.5 GB of weights exceed a 1 MiB working set
