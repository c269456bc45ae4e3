"""Time and peak memory of the vision tower per image size, before and after chunking its attention.

    python scripts/measure_vision_memory.py [--images 512x512,736x736,1024x1024] [--depth 1] [--dtype float32]
        [--extrapolate 2048x2048,4032x3024,8064x6048,8064x6048@48771072] [--breakdown]

The tower has the real widths (hidden 1152, 16 heads of 72, MLP 4304, merger to 2048) and random weights, with
`--depth` blocks instead of 27. An image WxH (or WxH@MAX_PIXELS, for a user who raises the processor's budget) gets
the patch grid of the released image processor (max_pixels 16,777,216 by default). "before" is one SDPA call per
frame, as the tower was before chunking (ATTENTION_BATCH_ELEMENTS unbounded); "after" is the tower as it is. Peak
memory is MLX's peak above the weights and the pixel values, which are allocated first.

Per block = (time at --depth - time at depth 0) / depth; a 27-block tower = depth 0 + 27 blocks. Rows of
--extrapolate are not run: their per-block time is a*N + b*N^2 and their peak p0 + p1*N, least-squares fits of the
measured rows; "before" adds the measured multiple of the [heads, N, N] scores. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_qwen36 import vision
from mlx_qwen36.image_processor import ImageProcessor
from mlx_qwen36.vision import VisionConfig, VisionModel

UNBOUNDED = 1 << 62
DEFAULT_BUDGET = vision.ATTENTION_BATCH_ELEMENTS
REAL_DEPTH = 27
GB = 1e9


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    max_pixels: int | None  # None: the released processor's budget

    @classmethod
    def parse(cls, spec: str) -> Image:
        size, _, budget = spec.partition("@")
        width, height = (int(v) for v in size.lower().split("x"))
        return cls(width, height, int(budget) if budget else None)

    @property
    def label(self) -> str:
        mp = self.width * self.height / 1e6
        budget = f", max_pixels {self.max_pixels:,}" if self.max_pixels else ""
        return f"{self.width}x{self.height} ({mp:.2g} MP{budget})"

    def grid(self) -> tuple[int, int, int]:
        processor = ImageProcessor() if self.max_pixels is None else ImageProcessor(max_pixels=self.max_pixels)
        return processor.grid_thw(self.height, self.width)


@dataclass
class Run:
    seconds: float
    peak: int  # bytes above weights and inputs


@dataclass
class Row:
    image: Image
    patches: int
    base: Run | None = None  # depth 0: patch embedding, positions, merger
    before: Run | None = None
    after: Run | None = None


def build_tower(depth: int, dtype: mx.Dtype) -> VisionModel:
    tower = VisionModel(VisionConfig(depth=depth))
    tower.patch_embed.proj.weight = 0.02 * mx.random.normal(tower.patch_embed.proj.weight.shape)  # zeros by default
    tower.set_dtype(dtype)
    mx.eval(tower.parameters())
    return tower


def measure(tower: VisionModel, pixels: mx.array, grid: tuple[int, int, int], budget: int) -> Run:
    vision.ATTENTION_BATCH_ELEMENTS = budget
    mx.clear_cache()
    mx.reset_peak_memory()
    start_bytes = mx.get_active_memory()
    start = time.perf_counter()
    mx.eval(tower(pixels, [grid]))
    return Run(time.perf_counter() - start, mx.get_peak_memory() - start_bytes)


def score_bytes(patches: int, dtype: mx.Dtype) -> int:
    """One SDPA call's [heads, N, N] scores over a whole frame."""
    return VisionConfig().num_heads * patches**2 * dtype.size


def weight_bytes(depth: int, dtype: mx.Dtype) -> int:
    return sum(v.size for _, v in tree_flatten(VisionModel(VisionConfig(depth=depth)).parameters())) * dtype.size


def measure_row(image: Image, towers: dict[int, VisionModel], depth: int, dtype: mx.Dtype, memory_limit: float) -> Row:
    grid = image.grid()
    row = Row(image, grid[0] * grid[1] * grid[2])
    pixels = mx.random.uniform(-1, 1, (row.patches, VisionConfig().patch_dim)).astype(dtype)
    mx.eval(pixels)
    row.base = measure(towers[0], pixels, grid, vision.ATTENTION_BATCH_ELEMENTS)
    row.after = measure(towers[depth], pixels, grid, DEFAULT_BUDGET)
    if 2 * score_bytes(row.patches, dtype) <= memory_limit:  # the scores and their softmax
        row.before = measure(towers[depth], pixels, grid, UNBOUNDED)
    vision.ATTENTION_BATCH_ELEMENTS = DEFAULT_BUDGET
    return row


def per_block(row: Row, run: Run, depth: int) -> float:
    return (run.seconds - row.base.seconds) / depth


def fit(x: np.ndarray, y: np.ndarray, powers: tuple[int, ...]) -> np.ndarray:
    """Least-squares coefficients of y = sum(c_i * x**p_i)."""
    design = np.stack([x.astype(np.float64) ** p for p in powers], axis=1)
    return np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]


@dataclass
class Model:
    """Fits of the measured rows: per-block time a*N + b*N^2 and depth-0 time c*N over all rows; the peak after as
    p0 + p1*N over the rows whose frame is over the budget (chunked: p0 is the constant chunk's share, p1 the O(N)
    activations); before as p1*N plus the measured multiple of its scores."""

    block: np.ndarray
    base: np.ndarray
    peak: np.ndarray | None
    scores_multiple: float | None

    @classmethod
    def of(cls, rows: list[Row], depth: int, dtype: mx.Dtype) -> Model:
        n = np.array([r.patches for r in rows])
        block = fit(n, np.array([per_block(r, r.after, depth) for r in rows]), (1, 2))
        base = fit(n, np.array([r.base.seconds for r in rows]), (1,))
        chunked = [r for r in rows if score_bytes(r.patches, dtype) > DEFAULT_BUDGET * dtype.size]
        if len(chunked) < 2:
            return cls(block, base, None, None)
        peak = fit(np.array([r.patches for r in chunked]), np.array([r.after.peak for r in chunked]), (0, 1))
        both = [r for r in rows if r.before]
        multiples = [(r.before.peak - peak[1] * r.patches) / score_bytes(r.patches, dtype) for r in both]
        return cls(block, base, peak, float(np.mean(multiples)) if both else None)

    def block_seconds(self, n: int) -> float:
        return float(self.block[0] * n + self.block[1] * n * n)

    def base_seconds(self, n: int) -> float:
        return float(self.base[0] * n)

    def peak_after(self, n: int) -> float:
        return float(self.peak[0] + self.peak[1] * n)


def fmt_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def fmt_gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes < 100 * GB else f"{nbytes / GB:,.0f} GB"


HEADER = ("| image (processor's grid) | patches | one frame's scores | before: peak | after: peak | before: 1 block "
          "| after: 1 block | after: 27-block tower |\n|---|---:|---:|---:|---:|---:|---:|---:|")


def measured_line(row: Row, depth: int, dtype: mx.Dtype) -> str:
    after_block = per_block(row, row.after, depth)
    before_peak = fmt_gb(row.before.peak) if row.before else "not run (memory)"
    before_block = fmt_time(per_block(row, row.before, depth)) if row.before else "-"
    tower = row.base.seconds + REAL_DEPTH * after_block
    return (f"| {row.image.label} | {row.patches:,} | {fmt_gb(score_bytes(row.patches, dtype))} | {before_peak} "
            f"| {fmt_gb(row.after.peak)} | {before_block} | {fmt_time(after_block)} | {fmt_time(tower)} |")


def extrapolated_line(image: Image, model: Model, dtype: mx.Dtype) -> str:
    grid = image.grid()
    n = grid[0] * grid[1] * grid[2]
    scores = score_bytes(n, dtype)
    after = f"*{fmt_gb(model.peak_after(n))}*" if model.peak is not None else "-"
    before = f"*{fmt_gb(model.peak[1] * n + model.scores_multiple * scores)}*" if model.scores_multiple else "-"
    block = model.block_seconds(n)
    tower = model.base_seconds(n) + REAL_DEPTH * block
    return (f"| *{image.label}*, extrapolated | {n:,} | {fmt_gb(scores)} | {before} | {after} "
            f"| - | *{fmt_time(block)}* | *{fmt_time(tower)}* |")


def breakdown(tower: VisionModel, image: Image, dtype: mx.Dtype) -> str:
    """Peak above inputs of a block's attention half and MLP half, each on its own, at one image size."""
    grid = image.grid()
    n = grid[0] * grid[1] * grid[2]
    grid_np = np.array([grid])
    block = tower.blocks[0]
    x = mx.random.normal((n, tower.cfg.hidden_size)).astype(dtype)
    cos, sin = tower.rotary(grid_np)
    runs = tower.attention_runs(grid_np)
    mx.eval(x, cos, sin)
    parts = {"attention (norm1, qkv, rotary, chunked SDPA, proj)": lambda: block.attn(block.norm1(x), cos, sin, runs),
             "MLP (norm2, fc1 1152->4304, gelu, fc2)": lambda: block.mlp(block.norm2(x))}
    lines = [f"Peak above the block's input at {image.label}, {n:,} patches:"]
    for name, fn in parts.items():
        mx.clear_cache()
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        mx.eval(fn())
        lines.append(f"- {name}: {fmt_gb(mx.get_peak_memory() - start)}")
    return "\n".join(lines)


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores, {ram:.1f} GiB RAM, MLX {mx.__version__} "
            f"({mx.default_device()} back end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="512x512,736x736,1024x1024", help="WxH[@MAX_PIXELS], comma-separated")
    parser.add_argument("--extrapolate", default="2048x2048,4032x3024,8064x6048,8064x6048@48771072")
    parser.add_argument("--depth", type=int, default=1, help="blocks run (the real tower has 27)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--memory-limit-gb", type=float, default=0.6 * os.sysconf("SC_PAGE_SIZE")
                        * os.sysconf("SC_PHYS_PAGES") / GB, help="skip 'before' where its scores would exceed this")
    parser.add_argument("--breakdown", action="store_true", help="peak of attention and MLP at the largest image")
    args = parser.parse_args()
    if args.depth < 1:
        parser.error("--depth must be >= 1")

    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)
    towers = {0: build_tower(0, dtype), args.depth: build_tower(args.depth, dtype)}
    images = [Image.parse(s) for s in args.images.split(",") if s]
    rows = []
    for image in images:
        rows.append(measure_row(image, towers, args.depth, dtype, args.memory_limit_gb * GB))
        print(measured_line(rows[-1], args.depth, dtype), flush=True)

    print(f"\n{machine()}; {args.dtype}; random weights, {args.depth} block(s) run; ATTENTION_BATCH_ELEMENTS "
          f"{DEFAULT_BUDGET:,}; weights: {fmt_gb(weight_bytes(args.depth, dtype))} at depth {args.depth}, "
          f"{fmt_gb(weight_bytes(REAL_DEPTH, dtype))} at depth {REAL_DEPTH} (not in the peaks)\n")
    print(HEADER)
    for row in rows:
        print(measured_line(row, args.depth, dtype))
    extrapolate = [Image.parse(s) for s in args.extrapolate.split(",") if s]
    if extrapolate and len(rows) >= 2:
        model = Model.of(rows, args.depth, dtype)
        for image in extrapolate:
            print(extrapolated_line(image, model, dtype))
        print(f"\nFits: per block {model.block[0] * 1e3:.3g} ms * N + {model.block[1] * 1e6:.3g} us * N^2")
        if model.peak is not None:
            print(f"Peak after: {fmt_gb(model.peak[0])} + {model.peak[1] / 1e3:.3g} kB * N (frames over the budget); "
                  f"before: {model.peak[1] / 1e3:.3g} kB * N + {model.scores_multiple or float('nan'):.2f} x the "
                  "scores")
    if args.breakdown:
        print()
        print(breakdown(towers[args.depth], max(images, key=lambda i: i.grid()[1] * i.grid()[2]), dtype))


if __name__ == "__main__":
    main()
