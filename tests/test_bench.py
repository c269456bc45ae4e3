"""The benchmark runs end to end on the tiny synthetic model, against mlx-lm, and reports every promised field (a smoke
test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from PIL import Image

from mlx_qwen36 import bench

LENGTHS = ("16", "40")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "mlx_qwen36.bench", "--synthetic", "tiny", "--compare", "mlx-lm",
           "--prompt-lengths", ",".join(LENGTHS), "--decode-tokens", "4", "--json", str(out / "bench.json"),
           "--markdown", str(out / "bench.md"), "--plot", str(out / "prefill.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| decode, pipelined as the generators run it (tok/s) |" in done.stdout  # the table is printed
    assert "[" in done.stderr and "/" in done.stderr  # the progress bar
    data = json.loads((out / "bench.json").read_text())
    data["_files"] = out
    return data


def test_two_key_results(report):
    for key in ("dispatches_per_token", "host_us_per_token", "prefill_tokens_per_s", "decode_tokens_per_s",
                "decode_sync_tokens_per_s", "ttft_s", "peak_memory_gb"):
        assert set(report[key]) == {"mlx_qwen36", "mlx_lm"}, key
    for name in ("mlx_qwen36", "mlx_lm"):
        assert isinstance(report["dispatches_per_token"][name], int) and report["dispatches_per_token"][name] > 0
        assert set(report["prefill_tokens_per_s"][name]) == set(LENGTHS)
        assert all(v > 0 for v in report["prefill_tokens_per_s"][name].values())
        assert report["decode_tokens_per_s"][name] > 0 and report["decode_sync_tokens_per_s"][name] > 0
        assert report["host_us_per_token"][name] > 0


def test_ratios_machine_and_bandwidth(report):
    r = report["ratios"]
    assert r["dispatches_per_token"] > 0 and r["decode_tokens_per_s"] > 0
    assert set(r["prefill_tokens_per_s"]) == set(LENGTHS)
    m = report["machine"]
    assert m["mlx"] == mx.__version__ and m["cores"] >= 1 and m["cpu"]
    assert report["memory_bandwidth_gbs"] > 0 and report["weight_bytes_per_token"] > 0
    assert 0 < report["bandwidth_fraction"]["mlx_qwen36"]


def test_same_weights_same_logits(report):
    assert report["max_abs_logit_diff"] < 1e-3


def test_table_and_plot(report):
    table = (report["_files"] / "bench.md").read_text()
    assert "| Measure | mlx_qwen36 | mlx-lm | ratio |" in table and "dispatches per decoded token" in table
    with Image.open(report["_files"] / "prefill.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_count_dispatches():
    a, b = mx.array([1.0]), mx.array([2.0])
    assert bench.count_dispatches((a + b) * b) == 2


def test_views_are_not_dispatches():
    a = mx.ones((2, 3))
    mx.eval(a)
    assert bench.count_dispatches(mx.expand_dims(a.T, 0)[:, 1:] * 2) == 1  # transpose, expand, slice: views
    assert "Transpose" in bench.graph_primitives(a.T * 2)


def test_check_kernels_reports_every_kernel(tmp_path):
    """`--check-kernels` here runs the kernels' sources in the emulator at small sizes and passes."""
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "-m", "mlx_qwen36.bench", "--check-kernels", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["backend"] == "emulator" and data["sizes"] == "small" and data["ok"]
    assert {r["kernel"] for r in data["rows"]} == {"gdn_mixer", "gdn_chunk_scan", "moe", "qmv"}
    assert all(r["error"] <= r["tolerance"] and r["kernel_ms"] > 0 for r in data["rows"])
    assert "| gdn_mixer | T=1 (decode) |" in done.stdout


def test_check_kernels_fails_on_a_kernel_that_does_not_compile(monkeypatch):
    from mlx_qwen36 import kernel_check
    from mlx_qwen36.ops import kernels
    from mlx_qwen36.ops.linear import QMV

    real = kernels.source.__wrapped__
    monkeypatch.setattr(kernels, "source", lambda f: real(f) + ("\n#error broken\n" if f == "qmv.metal" else ""))
    monkeypatch.setattr(QMV, "_made", {})
    case = kernel_check.qmv_cases(kernel_check.SMALL, mx.bfloat16, 4, 64)[0]
    with pytest.warns(RuntimeWarning, match="qmv"):
        row = kernel_check.check(case, repeats=1)
    kernels.reset()
    assert row["fell_back"] and not row["ok"]
    assert "FELL BACK" in kernel_check.markdown({"backend": "emulator", "sizes": "small", "device": "cpu",
                                                 "rows": [row], "ok": False})


def test_mac_graph_with_kernels_is_a_quarter_of_mlx_lms_launches():
    """The Mac graph of one 4-bit decode step (GDN heads the kernel covers): with the custom kernels, each block's
    mixer, MoE and projections are a few launches, under a quarter of mlx-lm's on the same weights; with them off
    (the references' Metal forms) the graph is several times larger. Counted from the graph, nothing is timed."""
    model, text = bench.synthetic_model("tiny", {"linear_key_head_dim": 32, "linear_value_head_dim": 32,
                                                 "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
                                                 "head_dim": 64, "hidden_size": 128}, mx.float32, 0)
    peer_model = bench.mlx_lm_model(model, text)
    bench.quantize(model, 4, 64)
    bench.quantize(peer_model, 4, 64)
    peer = bench.MlxLm(peer_model)
    ids = mx.array([[5, 9, 13, 2, 7, 11, 3, 8]])
    theirs = peer.mac_graphs(ids)["kernels"]
    ours = bench.Ours(model, compiled=False).mac_graphs(ids)
    assert set(ours) == {"kernels", "pure"}
    kernels_on, pure = ours["kernels"], ours["pure"]
    ours_kernels = {k for k in kernels_on["by_primitive"] if k.startswith("custom_kernel_")
                    and not k.startswith("custom_kernel_fast_")}  # not MLX's own (rms_norm, rope, sdpa)
    assert {k.split("__")[0] for k in ours_kernels} == {
        "custom_kernel_gdn_mixer", "custom_kernel_qmv", "custom_kernel_moe_router", "custom_kernel_moe_gate_up",
        "custom_kernel_moe_down"}
    assert not any(k.startswith(tuple(ours_kernels)) for k in pure["by_primitive"])
    assert kernels_on["dispatches"] <= 0.25 * theirs["dispatches"], (kernels_on["dispatches"], theirs["dispatches"])
    assert pure["dispatches"] > 3 * kernels_on["dispatches"]
    assert 0 < kernels_on["bytes"] < pure["bytes"]


def test_mtp_measurement_reports_costs_break_even_and_speeds():
    from mlx_qwen36 import spec_bench

    model, _ = bench.synthetic_model("tiny", {}, mx.float32, 0, mtp=True)
    r = spec_bench.measure_mtp(model, list(range(5, 21)), 12, depths=range(1, 3))
    assert r["greedy_identical"]
    assert r["plain_ms"] > 0 and r["draft_ms"] > 0 and set(r["verify_ms"]) == {1, 2}
    for m, be in r["break_even_acceptance"].items():
        assert be is None or 0 < be <= 1
        speeds = [r["projected_tokens_per_s"][m][a] for a in spec_bench.RATES]
        assert speeds == sorted(speeds)  # more acceptance, more speed
    assert r["plain_tokens_per_s"] > 0 and r["auto_tokens_per_s"] > 0 and r["auto_first_tokens_per_s"] > 0
    assert set(r["fixed_depth_tokens_per_s"]) == {1, 2}
    assert r["fixed_depth_acceptance"][2][:2] == [0.0, 0.0]  # random MTP weights: every draft rejected
    table = spec_bench.markdown(r)
    assert "| depth m | verify of m+1 tokens (ms) | break-even acceptance |" in table
    assert "| auto, next generation (" in table


def test_break_even_acceptance():
    from mlx_qwen36 import spec_bench

    c = {"plain_s": 1.0, "draft_s": 0.1, "verify_s": {1: 1.1, 2: 1.2, 3: 3.9}}
    assert abs(spec_bench.break_even(c, 1) - 0.2) < 1e-6  # 1 + a = 1.2
    assert abs(spec_bench.break_even(c, 2) - (-1 + 2.6**0.5) / 2) < 1e-6  # 1 + a + a^2 = 1.4
    assert spec_bench.break_even(c, 3) is None  # 4.2 plain steps for at most 4 tokens: never pays
