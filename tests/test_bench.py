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
