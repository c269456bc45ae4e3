"""Peak resident memory of `mlx_qwen36.load_model` on a random checkpoint of a few GB (real layer sizes).

    python scripts/measure_load_memory.py [--experts 64] [--dir /tmp/qwen36-synthetic]

Writes the checkpoint once (reused when present), then loads it in a fresh process and reports peak RSS against
the checkpoint size. The load must stay near one copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys, time
from pathlib import Path
from mlx_qwen36 import load_model

def hwm():
    status = Path("/proc/self/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # reset the peak: a child inherits its parent's
base = hwm()
t = time.perf_counter()
model = load_model(sys.argv[1])
took = time.perf_counter() - t
print(base, hwm(), took)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/qwen36-synthetic-load"))
    parser.add_argument("--experts", type=int, default=64)
    args = parser.parse_args()
    from mlx_qwen36 import synthetic

    if not (args.dir / "config.json").exists():
        synthetic.write_checkpoint(args.dir, synthetic.text_config("one-block", num_experts=args.experts),
                                   shard_bytes=1 << 30)
    size = json.loads((args.dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    out = subprocess.run([sys.executable, "-c", PROBE, str(args.dir)], capture_output=True, text=True, check=True)
    base, peak, took = out.stdout.split()
    base, peak = int(base), int(peak)
    gib = 1 << 30
    print(f"checkpoint {size / gib:.2f} GiB; peak RSS {peak / gib:.2f} GiB (process before loading "
          f"{base / gib:.2f} GiB); load growth / checkpoint = {(peak - base) / size:.2f}; {float(took):.1f} s")


if __name__ == "__main__":
    main()
