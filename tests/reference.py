"""Tiny random Qwen3.6 checkpoints built with transformers (the reference), in the real checkpoint layouts.

Used live by the parity tests when torch and transformers are installed (CI), and run as a script to refresh the
committed golden fixtures that let a plain `pytest` without torch still check parity:

    python tests/reference.py --out tests/fixtures

Each model kind ("moe" for qwen3_5_moe, "dense" for qwen3_5) is written in two layouts:
- `hf`: transformers' own `save_pretrained` output (fp32; per-expert tensors for the main MoE layers);
- `release`: the released-checkpoint layout (bf16, fused stacked experts, sharded with an index, `mtp.*` added
  with per-expert MTP experts, the release-style nested config with `full_attention_interval` and `mtp_*`).
Every zero-centred norm, the GDN output norm, `dt_bias` and `A_log` are randomised, so a missing +1, a shifted
GDN norm or a wrong sign changes the logits.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

SEED = 0
VOCAB = 512
SPECIAL_IDS = {"image_token_id": 498, "video_token_id": 499, "vision_start_token_id": 500, "vision_end_token_id": 501}

TEXT_CONFIG = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "initializer_range": 0.15,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10_000_000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "tie_word_embeddings": False,
    "bos_token_id": 497,
    "eos_token_id": 497,
}
MOE_FIELDS = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "shared_expert_intermediate_size": 32}
DENSE_FIELDS = {"intermediate_size": 128}
VISION_CONFIG = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
                 "num_position_embeddings": 64, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}

# The multimodal end-to-end parity runs on damped copies. At the default initializer_range this 4-layer decoder
# amplifies fp32 rounding so much over a 60-token prompt that transformers' own fp32 logits are 1.5-2.3e-4 from its
# float64 ones, leaving no room for a 1e-4 bound; at 0.05 they are 1.5e-5 apart, with logits still of order 2.
DAMPED_INITIALIZER_RANGE = 0.05

ZERO_CENTRED_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                         "k_norm.weight")


def input_ids(batch: int = 2, length: int = 12, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, 490, size=(batch, length), dtype=np.int32)


def build_hf_model(kind: str, seed: int = SEED, initializer_range: float = TEXT_CONFIG["initializer_range"]):
    """A randomly initialised transformers model of the given kind, with every norm and GDN scalar randomised."""
    import torch
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(TEXT_CONFIG, initializer_range=initializer_range, **(MOE_FIELDS if kind == "moe" else DENSE_FIELDS))
    if kind == "moe":
        config = Qwen3_5MoeConfig(text_config=text, vision_config=VISION_CONFIG, **SPECIAL_IDS)
        model = Qwen3_5MoeForConditionalGeneration(config)
    else:
        config = Qwen3_5Config(text_config=text, vision_config=VISION_CONFIG, **SPECIAL_IDS)
        model = Qwen3_5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(ZERO_CENTRED_SUFFIXES) or name.endswith("language_model.norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.float().eval()


def reference_logits(model, ids: np.ndarray, dtype=None) -> np.ndarray:
    import torch

    if dtype is not None:
        model = model.to(dtype)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False)
    return out.logits.float().numpy()


def _mtp_tensors(kind: str, state: dict, seed: int) -> dict:
    """Random `mtp.*` tensors in the release layout: one full-attention layer, per-expert MTP experts."""
    import torch

    gen = torch.Generator().manual_seed(seed + 3)
    H = TEXT_CONFIG["hidden_size"]

    def rnd(*shape, scale=0.15):
        return torch.randn(shape, generator=gen) * scale

    out = {
        "mtp.fc.weight": rnd(H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": rnd(H, scale=0.5),
        "mtp.pre_fc_norm_hidden.weight": rnd(H, scale=0.5),
        "mtp.norm.weight": rnd(H, scale=0.5),
    }
    attn_layer = "model.language_model.layers.3."
    for name, t in state.items():
        if name.startswith(attn_layer) and ".mlp.experts." not in name:
            out["mtp.layers.0." + name[len(attn_layer):]] = rnd(*t.shape, scale=float(t.float().std()) + 0.05)
    if kind == "moe":
        E, inter = MOE_FIELDS["num_experts"], MOE_FIELDS["moe_intermediate_size"]
        for e in range(E):
            out[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"] = rnd(inter, H)
            out[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"] = rnd(inter, H)
            out[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"] = rnd(H, inter)
    return out


def release_state(kind: str, model, seed: int = SEED) -> dict:
    """The model's tensors renamed and fused as in the released checkpoints, in bf16, with `mtp.*` added."""
    import torch

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if kind == "moe":
        fused = {}
        for name, t in model.named_parameters():
            if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
                fused[name] = t.detach().clone()
        # save_pretrained splits experts per expert; the release keeps them fused [E, 2I, H] / [E, H, I].
        state = {k: v for k, v in state.items() if ".mlp.experts." not in k}
        state.update(fused)
    state.update(_mtp_tensors(kind, state, seed))
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def release_config(kind: str, hf_config: dict) -> dict:
    """The release-style config.json: nested, interval instead of layer_types, MTP fields, no transformers extras."""
    text = {k: v for k, v in hf_config["text_config"].items() if k not in ("layer_types", "initializer_range")}
    text.update(full_attention_interval=4, attn_output_gate=True, mtp_num_hidden_layers=1,
                mtp_use_dedicated_embeddings=False, mamba_ssm_dtype="float32", dtype="bfloat16")
    cfg = {k: v for k, v in hf_config.items() if k not in ("text_config", "transformers_version")}
    cfg["text_config"] = text
    cfg["architectures"] = ["Qwen3_5MoeForConditionalGeneration" if kind == "moe" else
                            "Qwen3_5ForConditionalGeneration"]
    return cfg


def save_sharded(state: dict, out: Path, n_shards: int = 2) -> None:
    from safetensors.torch import save_file

    names = sorted(state)
    per = (len(names) + n_shards - 1) // n_shards
    weight_map, total = {}, 0
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        save_file(part, str(out / shard), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoints(kind: str, out: Path, seed: int = SEED) -> dict[str, Path]:
    """Write `<out>/<kind>-hf` and `<out>/<kind>-release`; returns their paths."""
    model = build_hf_model(kind, seed)
    hf_dir, rel_dir = out / f"{kind}-hf", out / f"{kind}-release"
    for d in (hf_dir, rel_dir):
        shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(hf_dir)
    rel_dir.mkdir(parents=True)
    save_sharded(release_state(kind, model, seed), rel_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    (rel_dir / "config.json").write_text(json.dumps(release_config(kind, hf_config), indent=2))
    return {"hf": hf_dir, "release": rel_dir}


def write_damped_checkpoint(kind: str, out: Path, seed: int = SEED) -> Path:
    """`<out>/<kind>-damped`: transformers' `save_pretrained` output of a model built at DAMPED_INITIALIZER_RANGE."""
    path = out / f"{kind}-damped"
    shutil.rmtree(path, ignore_errors=True)
    build_hf_model(kind, seed, DAMPED_INITIALIZER_RANGE).save_pretrained(path)
    return path


def golden(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    """Reference logits for `input_ids()`: the fp32 `hf` checkpoint, and the bf16 `release` checkpoint run by
    transformers both upcast to fp32 and in bf16 (transformers ignores `mtp.*`)."""
    import torch
    from transformers import AutoModelForImageTextToText

    def run(path: Path, dtype) -> np.ndarray:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
        return reference_logits(model, ids)

    def greedy(path: Path, new_tokens: int = 16) -> np.ndarray:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        prompt = torch.from_numpy(ids[:1].astype(np.int64))
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        return out[0, ids.shape[1]:].numpy().astype(np.int32)

    ids = input_ids()
    return {
        "input_ids": ids,
        "greedy_fp32": greedy(paths["hf"]),
        "logits_fp32": run(paths["hf"], torch.float32),
        "logits_release_fp32": run(paths["release"], torch.float32),
        "logits_release_bf16": run(paths["release"], torch.bfloat16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "fixtures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in ("moe", "dense"):
        paths = write_checkpoints(kind, args.out)
        np.savez(args.out / f"{kind}-golden.npz", **golden(paths))
        print(f"wrote {paths['hf']}, {paths['release']}, {kind}-golden.npz")


if __name__ == "__main__":
    main()
