"""The vision tower (`visual.*`): patch embedding, resampled learned positions, 2-D rotary, ViT blocks, 2x2 merger.

`VisionModel(config.vision)(pixel_values [N, C*T*p*p], grid_thw [n, 3]) -> [N / merge**2, out_hidden_size]`.

- `pixel_values` rows are the processor's patches in (C, T, py, px) order, emitted 2x2-merge-block major; `grid_thw`
  gives each image's or video's (t, h, w) in patch units, in the order of the rows.
- Attention is full (non-causal) within a frame and never crosses frames: one segment per temporal patch of each
  grid (HF's `cu_seqlens`). Consecutive segments of equal length are batched into one SDPA call, in bounded groups,
  so a long video costs O(frames * (h*w)^2), never O((frames*h*w)^2).
- Attention memory is bounded per SDPA call, not per frame. Where no fused kernel exists (the CPU back end, CUDA in
  fp32), SDPA materialises its `[frames, heads, queries, keys]` scores: 144 GB in fp32 for the 47,376 patches of a
  12 MP photo. A frame over `ATTENTION_BATCH_ELEMENTS` scores runs in query chunks instead, each an exact softmax
  over all of the frame's keys, so the features are those of one call.
- The patch embedding keeps the checkpoint's channels-last Conv3d weight `[out, T, py, px, C]` (the MLX and mlx-vlm
  layout) and applies it as a Linear over the 1536-value patch, after reordering it to the processor's (C, T, py, px).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Max attention-score elements (frames x heads x queries x keys) of one SDPA call that materialises its scores: it
# caps how many equal-length frames share a call, and the query chunk of a frame too large for one call. 2**26
# elements are 256 MiB in fp32, less than one [47376, 4304] MLP activation of a 12 MP photo (778 MiB).
ATTENTION_BATCH_ELEMENTS = 1 << 26

ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu": nn.gelu,
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "silu": nn.silu,
}


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        fields["rope_theta"] = float(theta)
        for k in ("patch_size", "temporal_patch_size"):  # HF allows [n, n]; the released configs use an int
            if isinstance(fields.get(k), (list, tuple)):
                fields[k] = int(fields[k][0])
        cfg = cls(**fields)
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"vision_config: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must give "
                             "a head_dim divisible by 4 (2-D rotary)")
        side = int(round(cfg.num_position_embeddings**0.5))
        if side * side != cfg.num_position_embeddings:
            raise ValueError(f"vision_config: num_position_embeddings {cfg.num_position_embeddings} is not square")
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config: hidden_act '{cfg.hidden_act}' is not supported")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))


def as_grid(grid_thw: Any) -> np.ndarray:
    """Any grid_thw (mx/np array, list of triples, torch tensor) -> int64 numpy [n, 3]."""
    if grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    if hasattr(grid_thw, "detach"):  # torch
        grid_thw = grid_thw.detach().cpu().numpy()
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim == 1 and grid.size == 3:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [n, 3], got {tuple(grid.shape)}")
    if (grid <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    return grid


def merge_order(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w grid in the processor's order: merge blocks raster, then in-block."""
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    shape = (h // merge, w // merge, merge, merge)
    rows = np.broadcast_to(rows.transpose(0, 2, 1, 3), shape).reshape(-1)
    cols = np.broadcast_to(cols.transpose(0, 2, 1, 3), shape).reshape(-1)
    return rows, cols


def bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """align_corners=True bilinear taps [n, 2] (border-clamped) and weights [n, 2] on one axis, in float32."""
    denom = np.float32(max(size - 1, 1))
    src = index.astype(np.float32) * np.float32(side - 1) / denom
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor[:, None].astype(np.int64) + offsets.astype(np.int64), 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), np.float32(0))
    return taps, weights.astype(np.float32)


class PatchProjection(nn.Module):
    """Conv3d with kernel == stride, stored channels-last `[out, T, py, px, C]`, applied as a Linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        self.weight = mx.zeros((cfg.hidden_size, tp, p, p, cfg.in_channels))
        self.bias = mx.zeros((cfg.hidden_size,))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight
        # The processor flattens each patch as (C, T, py, px): move C to the front to match, exactly.
        w = w.transpose(0, 4, 1, 2, 3).reshape(w.shape[0], -1)
        return mx.addmm(self.bias, x.astype(w.dtype), w.T)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_dim = cfg.patch_dim
        self.proj = PatchProjection(cfg)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values.reshape(-1, self.patch_dim))


def rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def frame_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Full attention within each frame: q, k, v `[frames, heads, L, head_dim]` -> `[frames, heads, L, head_dim]`.

    Up to ATTENTION_BATCH_ELEMENTS scores it is one SDPA call. Above, a fused kernel if the back end has one for these
    shapes (Metal has one for head dim 72 since MLX 0.32.2: it never holds the scores), else query chunks.
    """
    B, H, L, _ = q.shape
    if B * H * L * L <= ATTENTION_BATCH_ELEMENTS:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    try:  # force_fused raises ValueError while building the graph, before any work, where no fused kernel exists
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, force_fused=True)
    except ValueError:
        return chunked_attention(q, k, v, scale)


def chunked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Exact attention in query chunks of at most ATTENTION_BATCH_ELEMENTS scores, each against all of the keys.

    Each chunk is evaluated before the next one is built. Left lazy, MLX schedules the graph breadth-first (20 arrays
    wide) and keeps ~20 chunks' scores alive at once (measured: 21 x one chunk's bytes). The eval also evaluates the
    tower up to this layer; it runs only for frames above the budget, and the tower is never traced by mx.compile
    (where an eval is not allowed).
    """
    B, H, L, _ = q.shape
    rows = max(1, ATTENTION_BATCH_ELEMENTS // (B * H * L))
    # Strided views of the fused qkv: without one copy here, every chunk's matmul would copy k and v again.
    k, v = mx.contiguous(k), mx.contiguous(v)
    chunks = []
    for start in range(0, L, rows):
        chunk = mx.fast.scaled_dot_product_attention(q[:, :, start:start + rows], k, v, scale=scale)  # [B, H, rows, D]
        mx.eval(chunk)
        chunks.append(chunk)
    return mx.concatenate(chunks, axis=2)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, runs: list[tuple[int, int, int]]) -> mx.array:
        N = x.shape[0]
        qkv = self.qkv(x).reshape(N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, heads, head_dim]
        dtype = q.dtype
        q32, k32 = q.astype(mx.float32), k.astype(mx.float32)
        q = (q32 * cos + rotate_half(q32) * sin).astype(dtype)
        k = (k32 * cos + rotate_half(k32) * sin).astype(dtype)

        outs = []
        for start, length, count in runs:
            qs, ks, vs = (t[start:start + length * count].reshape(count, length, self.num_heads, self.head_dim)
                          .transpose(0, 2, 1, 3) for t in (q, k, v))
            o = frame_attention(qs, ks, vs, self.scale)  # [count, heads, length, head_dim]
            outs.append(o.transpose(0, 2, 1, 3).reshape(length * count, -1))
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return self.proj(o)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, runs: list[tuple[int, int, int]]) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, 2x2 neighbours concatenated (consecutive rows), fc1 -> exact GELU -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    """`VisionModel(config.vision)(pixel_values [N, 1536], grid_thw [n, 3]) -> [N / 4, out_hidden_size]`."""

    def __init__(self, config: dict[str, Any] | VisionConfig):
        super().__init__()
        cfg = config if isinstance(config, VisionConfig) else VisionConfig.from_dict(config)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = [VisionBlock(cfg) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)
        spatial = cfg.head_dim // 2
        self._inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))

    @property
    def spatial_merge_unit(self) -> int:
        return self.cfg.spatial_merge_size**2

    def check_grid(self, grid: np.ndarray, n_patches: int | None = None) -> None:
        m = self.cfg.spatial_merge_size
        if ((grid[:, 1:] % m) != 0).any():
            raise ValueError(f"grid_thw {grid.tolist()}: h and w must be multiples of spatial_merge_size {m}")
        total = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        if n_patches is not None and total != n_patches:
            raise ValueError(f"pixel_values has {n_patches} patches but grid_thw {grid.tolist()} describes {total}")

    def position_embeddings(self, grid: np.ndarray, dtype: mx.Dtype) -> mx.array:
        """The learned 48x48 table bilinearly resampled (align_corners=True) to each grid, merge-block order."""
        side, m = self.cfg.grid_side, self.cfg.spatial_merge_size
        tables: dict[tuple[int, int], mx.array] = {}
        parts = []
        for t, h, w in grid.tolist():
            if (h, w) not in tables:
                rows, cols = merge_order(h, w, m)
                h_taps, h_w = bilinear_taps(rows, h, side)
                w_taps, w_w = bilinear_taps(cols, w, side)
                idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
                wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
                rows_emb = self.pos_embed(mx.array(idx.astype(np.int32)))  # [h*w, 4, D]
                tables[(h, w)] = (rows_emb * mx.array(wts)[:, :, None]).sum(axis=1).astype(dtype)
            table = tables[(h, w)]
            parts.append(mx.tile(table, (t, 1)) if t > 1 else table)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)

    def rotary(self, grid: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos, sin [N, 1, head_dim] (fp32) of the axial rotary: angles [h*f | w*f] duplicated, rotate-half."""
        m = self.cfg.spatial_merge_size
        pos = []
        for t, h, w in grid.tolist():
            rows, cols = merge_order(h, w, m)
            pos.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
        pos = mx.array(np.concatenate(pos).astype(np.float32))  # [N, 2]
        freqs = pos[:, :, None] * mx.array(self._inv_freq)  # [N, 2, F]
        freqs = freqs.reshape(pos.shape[0], -1)  # [h*f | w*f]
        angles = mx.concatenate([freqs, freqs], axis=-1)[:, None, :]
        return mx.cos(angles), mx.sin(angles)

    def attention_runs(self, grid: np.ndarray) -> list[tuple[int, int, int]]:
        """(start, segment length, segment count): runs of consecutive equal-length frames, bounded in size."""
        lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]).tolist()
        runs: list[tuple[int, int, int]] = []
        start = 0
        heads = self.cfg.num_heads
        for L in lengths:
            cap = max(1, ATTENTION_BATCH_ELEMENTS // (heads * L * L))
            if runs and runs[-1][1] == L and runs[-1][2] < cap:
                s, _, c = runs[-1]
                runs[-1] = (s, L, c + 1)
            else:
                runs.append((start, L, 1))
            start += L
        return runs

    def __call__(self, pixel_values: mx.array | np.ndarray, grid_thw: Any) -> mx.array:
        """Features `[patches / merge², out_hidden]` of `pixel_values` `[patches, C·tp·p·p]` (MLX or NumPy, as the
        processors return them) laid out by `grid_thw` `[n, 3]`."""
        grid = as_grid(grid_thw)
        pixel_values = mx.array(pixel_values) if not isinstance(pixel_values, mx.array) else pixel_values
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.cfg.patch_dim:
            raise ValueError(f"pixel_values must have shape [patches, {self.cfg.patch_dim}], "
                             f"got {tuple(pixel_values.shape)}")
        self.check_grid(grid, pixel_values.shape[0])
        x = self.patch_embed(pixel_values)
        x = x + self.position_embeddings(grid, x.dtype)
        cos, sin = self.rotary(grid)
        runs = self.attention_runs(grid)
        for block in self.blocks:
            x = block(x, cos, sin, runs)
        return self.merger(x)
