"""Long context: YaRN switched on by `max_context` past the native length, equal to transformers with the same
rope parameters; a checkpoint already configured for YaRN unchanged; limits named."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_qwen36 import load_model
from mlx_qwen36.config import YARN_FACTOR, ConfigError, ModelConfig, with_max_context

TEXT = {"model_type": "qwen3_5_moe_text", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "max_position_embeddings": 262144, "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}}


def config(**text) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": dict(TEXT, **text)})


def test_max_context_switches_yarn_on_past_the_native_length():
    native = config()
    assert with_max_context(native, 262144) is native and with_max_context(native, 4096) is native
    long = with_max_context(native, 1_010_000)
    rope = long.text.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", YARN_FACTOR, 262144)
    assert long.text.max_position_embeddings == 4 * 262144
    params = long.raw["text_config"]["rope_parameters"]  # what the prompt cache fingerprints
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0 and params["rope_theta"] == 1e7
    assert native.raw["text_config"]["rope_parameters"]["rope_type"] == "default"  # not changed in place
    with pytest.raises(ConfigError, match="exceeds 1,048,576"):
        with_max_context(native, 2_000_000)
    with pytest.raises(ConfigError, match="positive"):
        with_max_context(native, 0)


def test_a_checkpoint_already_on_yarn_keeps_its_parameters():
    yarn = config(max_position_embeddings=1_010_000, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144, "rope_theta": 1e7})
    assert with_max_context(yarn, 1_000_000) is yarn
    with pytest.raises(ConfigError, match="YaRN"):
        with_max_context(yarn, 1_100_000)


def test_yarn_logits_equal_transformers(tiny, tmp_path):
    """The tiny checkpoint (native 4,096) loaded with max_context 16,384, against transformers given the same
    rope_parameters: equal to 1e-4, and not equal to the native model's (YaRN's attention scaling shows even at
    short positions)."""
    torch = pytest.importorskip("torch", reason="transformers reference not installed")
    from transformers import AutoModelForImageTextToText

    src = tiny["moe"]["hf"]
    ids = tiny["moe"]["golden"]["input_ids"]
    ours = load_model(src, max_context=16384)
    assert ours.config.text.rope.rope_type == "yarn"
    got = np.array(ours(mx.array(ids)))

    hf = tmp_path / "hf-yarn"
    shutil.copytree(src, hf)
    cfg = json.loads((hf / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    native = text["max_position_embeddings"]
    text["rope_parameters"] = dict(text["rope_parameters"], rope_type="yarn", factor=4.0,
                                   original_max_position_embeddings=native)
    text["max_position_embeddings"] = 4 * native
    (hf / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - tiny["moe"]["golden"]["logits_fp32"]).max() > 1e-3


def test_command_lines_take_max_context(chat_dir, capsys):
    import importlib

    from mlx_qwen36 import chat, server

    cli = importlib.import_module("mlx_qwen36.generate")
    for module in (chat, cli, server):
        assert module.parser().parse_args(["--max-context", "300000", *(["-p", "x"] if module is cli else [])]
                                          ).max_context == 300000
    args = ["--model", str(chat_dir), "--prompt", "hi", "--temp", "0", "--max-tokens", "2"]
    assert cli.main([*args, "--max-context", "300000"]) == 0  # YaRN past the native 262,144
    assert "Generation: 2 tokens" in capsys.readouterr().err
    assert cli.main([*args, "--max-context", "2000000"]) == 1
    assert "error: max_context 2,000,000 exceeds 1,048,576" in capsys.readouterr().err


# --- the quantized KV cache -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, group", [(8, 32), (8, 64), (4, 32), (4, 64)])
@pytest.mark.parametrize("T", [1, 5])
def test_quantized_attention_equals_attention_over_the_dequantized_cache(bits, group, T):
    from mlx_qwen36.ops.attention import QuantizedKV, attention

    mx.random.seed(0)
    q = mx.random.normal((2, 4, T, 64))
    k, v = mx.random.normal((2, 2, 40, 64)), mx.random.normal((2, 2, 40, 64))
    kq, vq = (QuantizedKV(*mx.quantize(a, group_size=group, bits=bits), bits, group) for a in (k, v))
    kd, vd = (mx.dequantize(a.weight, a.scales, a.biases, group_size=group, bits=bits) for a in (kq, vq))
    mask = "causal" if T > 1 else None
    want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=mask)
    got = attention(q, kq, vq, 0.125, mask)
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-4


def run_turns(model, kv_bits=None, draft_tokens=None, **gen):
    """Logits of a prompt and 6 decode steps on one cache, compiled step included."""
    from mlx_qwen36.fast import make_decode_step

    cache = model.make_cache(kv_bits, 32) if kv_bits else model.make_cache()  # the tiny head_dim is 32
    ids = mx.array([[3, 17, 101, 250, 9, 44, 7, 90]])
    out = [model(ids, cache)[:, -1]]
    step = make_decode_step(model)
    for t in (5, 77, 12, 300, 41, 8):
        out.append(step(mx.array([[t]]), cache)[:, -1])
    mx.eval(out)
    return np.stack([np.array(o.astype(mx.float32)) for o in out]), cache


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_quantized_kv_error_and_memory(tiny, dtype):
    """Logit error against the unquantized cache (relative RMS), and the bytes of the attention layers' cache."""
    model = load_model(tiny["moe"]["hf"], dtype=dtype)
    want, plain = run_turns(model)
    scale = np.sqrt((want ** 2).mean())
    size = 4 if dtype == mx.float32 else 2
    for bits, limit in ((8, 0.01), (4, 0.05)):
        ratio = (bits / 8 + 2 * size / 32) / size  # packed values, plus a scale and a bias per group of 32
        got, cache = run_turns(model, bits)
        err = np.sqrt(((got - want) ** 2).mean()) / scale
        assert err < limit, (bits, err)
        kv = [c for c in cache if hasattr(c, "bits")]
        assert kv and kv[0].bits == bits
        stored = sum(c.nbytes for c in kv)
        full = sum(c.nbytes for c in plain if type(c).__name__ == "KVCache")
        assert abs(stored / full - ratio) < 1e-6, (bits, stored / full)
    with pytest.raises(ValueError, match="kv_group_size 64 does not divide head_dim 32"):
        model.make_cache(8, 64)


def test_quantized_kv_through_the_generator_prompt_cache_and_speculation(mtp_chat_dir, tmp_path):
    """A quantized cache across turns, saved and loaded, rolled back by speculative decoding: the same tokens as
    recomputing with a fresh quantized cache each time."""
    from mlx_qwen36 import generate, load, make_prompt_cache
    from mlx_qwen36.cache import QuantizedKVCache
    from mlx_qwen36.prompt_cache import PromptCache

    model, processor = load(mtp_chat_dir, mtp=True)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    kv = {"kv_bits": 8, "kv_group_size": 32}
    pc = make_prompt_cache(model, **kv)
    assert any(isinstance(c, QuantizedKVCache) for c in pc.cache)
    first = generate(model, processor, messages, max_tokens=8, temperature=0, prompt_cache=pc, draft_tokens=2)
    fresh = generate(model, processor, messages, max_tokens=8, temperature=0, **kv)
    assert first.tokens == fresh.tokens
    assert all(c.offset == len(pc.tokens) for c in pc.cache)
    pc.save(tmp_path / "conversation.safetensors")
    loaded = PromptCache.load(model, tmp_path / "conversation.safetensors")
    assert (loaded.kv_bits, loaded.kv_group_size) == (8, 32)
    messages += [{"role": "assistant", "content": first.content, "reasoning_content": first.reasoning},
                 {"role": "user", "content": "And the mountains?"}]
    again = generate(model, processor, messages, max_tokens=8, temperature=0, prompt_cache=loaded)
    assert again.cached_tokens > 0
    assert again.tokens == generate(model, processor, messages, max_tokens=8, temperature=0, **kv).tokens
    with pytest.raises(ValueError, match="differ from the prompt cache"):
        generate(model, processor, messages, max_tokens=2, prompt_cache=loaded, kv_bits=4, kv_group_size=32)


def test_kv_bits_on_the_command_line(chat_dir, capsys):
    import importlib

    cli = importlib.import_module("mlx_qwen36.generate")
    args = ["--model", str(chat_dir), "--prompt", "hi", "--temp", "0", "--max-tokens", "3", "--no-think"]
    flags = [*args, "--kv-bits", "8", "--kv-group-size", "32"]
    kwargs = cli.generation_kwargs(cli.parser().parse_args(flags))
    assert (kwargs["kv_bits"], kwargs["kv_group_size"]) == (8, 32)
    assert "kv_bits" not in cli.generation_kwargs(cli.parser().parse_args(args))
    assert cli.main(flags) == 0
    assert "Generation: 3 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parser().parse_args([*args, "--kv-bits", "3"])


# --- long prompts: bounded prefill ---------------------------------------------------------------------------


def test_long_prefill_peak_does_not_grow_with_the_prompt(tiny):
    """Prefill of 2,048 and of 8,192 tokens: the peak grows by the KV cache (and one copy of it while a buffer
    grows), not with the prompt: chunks of 512 evaluated one by one, and attention holding no [heads, T, S]
    scores (those would add 50 MB here)."""
    model = load_model(tiny["moe"]["hf"], max_context=16384)
    peaks, kv = [], []
    for n in (2048, 8192):
        ids = mx.array(np.random.default_rng(0).integers(0, 512, (1, n)), dtype=mx.int32)
        mx.eval(ids)
        cache = model.make_cache()
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(model.prefill(ids, cache, chunk_size=512))
        peaks.append(mx.get_peak_memory() - base)
        kv.append(sum(c.nbytes for c in cache if hasattr(c, "keys")))
        del cache
    growth = peaks[1] - peaks[0]
    assert growth <= 2 * (kv[1] - kv[0]) + (2 << 20), (peaks, kv)


# --- the memory plan --------------------------------------------------------------------------------------------

REAL_35B = {"model_type": "qwen3_5_moe", "text_config": dict(
    TEXT, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    vocab_size=248320, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
    linear_value_head_dim=128, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, full_attention_interval=4)}


def test_the_35b_kv_and_gdn_state_sizes():
    from mlx_qwen36 import memory

    cfg = ModelConfig.from_dict(REAL_35B)
    assert memory.kv_bytes_per_token(cfg) == 10 * 2 * 2 * 256 * 2 == 20480  # ~5.4 GB at 262,144 tokens
    assert memory.kv_bytes_per_token(cfg, kv_bits=8) == 10 * 2 * 2 * 256 * (1 + 4 / 64)
    assert memory.kv_bytes_per_token(cfg, kv_bits=4, kv_group_size=32) == 10 * 2 * 2 * 256 * (0.5 + 4 / 32)
    assert memory.kv_bytes_per_token(cfg, mtp=True) == 11 * 2 * 2 * 256 * 2
    assert memory.gdn_state_bytes(cfg) == 30 * (3 * 8192 * 2 + 32 * 128 * 128 * 4)  # 64 MB, at any context


def test_plan_of_a_checkpoint(tiny):
    from mlx_qwen36 import memory

    folder = tiny["moe"]["release"]
    model = load_model(folder, mtp=True)
    parts = memory.weight_bytes(folder)
    assert parts["mtp"] > 0 and parts["vision"] > 0
    loaded = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if "visual" not in k)
    assert abs(loaded - parts["text"] - parts["mtp"]) < 0.01 * loaded  # (norms and gates are kept fp32 when loaded)
    p = memory.plan(folder, 8000, available=10 << 20)
    assert p.context == 8000 and p.kv == 8000 * p.kv_per_token and p.reach == 4 * 4096
    assert p.total == p.weights + p.kv + p.gdn_state + p.prefill  # MTP and vision not loaded
    assert p.fits == (p.total <= 10 << 20)
    tight = memory.plan(folder, 8000, available=p.total - p.kv + 1000 * p.kv_per_token)
    assert not tight.fits and tight.max_context == 1000
    with pytest.raises(memory.MemoryPlanError, match="the longest that fits is 1,000 tokens"):
        memory.check_fits(folder, 8000, available=tight.available)
    assert memory.check_fits(folder, None, available=tight.available) == 1000  # no --max-context: capped
    assert "does NOT fit" in tight.table() and "| KV cache at 8,000 tokens (512 B/token) |" not in tight.table()


def test_command_lines_refuse_what_does_not_fit_and_cap_the_rest(chat_dir, monkeypatch, capsys):
    import importlib

    from mlx_qwen36 import memory

    cli = importlib.import_module("mlx_qwen36.generate")
    room = memory.plan(chat_dir, 40_000, available=1 << 40)
    monkeypatch.setattr(memory, "available_bytes", lambda: room.total - room.kv + 40 * room.kv_per_token)
    args = ["--model", str(chat_dir), "--temp", "0", "--max-tokens", "2"]
    assert cli.main([*args, "--prompt", "hi", "--max-context", "40000"]) == 1
    assert "does not fit this machine" in capsys.readouterr().err
    assert cli.main([*args, "--prompt", "hi"]) == 0  # fits in the 40 tokens the plan allows
    capsys.readouterr()
    assert cli.main([*args, "--prompt", "word " * 60]) == 1
    err = capsys.readouterr().err
    assert "the model's context is 40 tokens" in err and "bench --plan" in err


def test_bench_plan_prints_and_exits_by_the_verdict(tiny, capsys):
    from mlx_qwen36 import bench

    with pytest.raises(SystemExit) as done:
        bench.main(["--plan", "--model", str(tiny["moe"]["release"]), "--context", "8000", "--mtp"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "| MTP head |" in out and "8,000 tokens fits" in out
