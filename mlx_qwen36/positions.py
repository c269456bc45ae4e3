"""3-D (t, h, w) M-RoPE position ids for prompts with images and videos (HF's `get_rope_index`), and the decode rule.

Token types: `<|image_pad|>` is 1, `<|video_pad|>` is 2, everything else (vision start/end included) is text. Every
video grid (Tg, h, w) is split into Tg grids (1, h, w), since timestamps and start/end tokens separate its frames.
Walking the sequence with `cur = 0`:

- a text run of length L takes `cur .. cur+L-1` on all three axes, then `cur += L`;
- a vision grid (1, h, w) with merged size (h', w') takes t = cur, h = cur + row, w = cur + col over the merged grid
  in raster order, then `cur += max(h', w')`.

`rope_delta = max(position) + 1 - length`. A token at cache index `i` after the prompt (decode) has position
`i + rope_delta` on all three axes: see `text_position_ids`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from .config import ModelConfig
from .vision import as_grid

TEXT, IMAGE, VIDEO = 0, 1, 2


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def token_types(input_ids: Any, config: ModelConfig) -> np.ndarray:
    """`mm_token_type_ids`: 0 text, 1 image pad, 2 video pad, same shape as input_ids."""
    ids = _numpy(input_ids)
    types = np.zeros(ids.shape, dtype=np.int32)
    types[ids == config.image_token_id] = IMAGE
    types[ids == config.video_token_id] = VIDEO
    return types


def split_video_grids(video_grid_thw: Any) -> np.ndarray:
    """Each video grid (t, h, w) -> t grids (1, h, w)."""
    grid = as_grid(video_grid_thw)
    out = np.repeat(grid, grid[:, 0], axis=0)
    out[:, 0] = 1
    return out


def vision_positions(start: int, grid: np.ndarray, merge: int) -> np.ndarray:
    """[3, t*h'*w'] positions of one vision grid placed at `start`."""
    t, h, w = (int(v) for v in grid)
    gt, gh, gw = t, h // merge, w // merge
    tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.reshape(-1) + start, hh.reshape(-1) + start, ww.reshape(-1) + start])


def get_rope_index(input_ids: Any, image_grid_thw: Any, video_grid_thw: Any, config: ModelConfig,
                   attention_mask: Any = None) -> tuple[mx.array, mx.array]:
    """(position_ids [3, B, T] int32, rope_deltas [B] int32) for `input_ids [B, T]`, equal to transformers'.

    Grids are consumed in order across the batch (images from `image_grid_thw`, video frames from
    `video_grid_thw`). With `attention_mask`, positions are computed over the unmasked tokens only and masked slots
    hold 0. A run of pad tokens that does not match its grids raises ValueError.
    """
    ids = _numpy(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    B, T = ids.shape
    types = token_types(ids, config)
    mask = None if attention_mask is None else _numpy(attention_mask).astype(bool).reshape(B, T)
    merge = int((config.vision or {}).get("spatial_merge_size", 2))
    grids = {IMAGE: list(as_grid(image_grid_thw)), VIDEO: list(split_video_grids(video_grid_thw))}
    used = {IMAGE: 0, VIDEO: 0}
    names = {IMAGE: "image", VIDEO: "video"}

    position_ids = np.zeros((3, B, T), dtype=np.int64)
    deltas = np.zeros((B,), dtype=np.int64)
    for b in range(B):
        keep = np.ones(T, dtype=bool) if mask is None else mask[b]
        row = types[b][keep]
        n = len(row)
        if n == 0:
            continue
        pieces = []
        cur = 0
        # Runs of equal token type.
        bounds = np.flatnonzero(np.diff(row)) + 1
        for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])):
            kind = int(row[s])
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(cur, cur + e - s), (3, e - s)))
                cur += int(e - s)
                continue
            covered = 0
            while covered < e - s:  # adjacent grids of one type without text between them share a run
                if used[kind] >= len(grids[kind]):
                    raise ValueError(f"batch row {b}: more <|{names[kind]}_pad|> tokens than "
                                     f"{names[kind]}_grid_thw describes ({len(grids[kind])} "
                                     f"{'frame ' if kind == VIDEO else ''}grids)")
                grid = grids[kind][used[kind]]
                used[kind] += 1
                pos = vision_positions(cur, grid, merge)
                pieces.append(pos)
                covered += pos.shape[1]
                cur += max(int(grid[1]), int(grid[2])) // merge
            if covered != e - s:
                raise ValueError(f"batch row {b}: a run of {e - s} <|{names[kind]}_pad|> tokens does not match "
                                 f"the {names[kind]} grids ({covered} tokens)")
        llm = np.concatenate(pieces, axis=1)
        position_ids[:, b, keep] = llm
        deltas[b] = llm.max() + 1 - n
    return mx.array(position_ids.astype(np.int32)), mx.array(deltas.astype(np.int32))


def text_position_ids(start: int | mx.array, length: int, rope_deltas: int | mx.array = 0,
                      batch: int | None = None) -> mx.array:
    """[3, B, length] position ids of text tokens at cache indices `start .. start+length-1` after a prompt whose
    `rope_deltas` (scalar or [B]) came from `get_rope_index`: `index + rope_delta` on all three axes."""
    deltas = mx.array(rope_deltas, dtype=mx.int32) if not isinstance(rope_deltas, mx.array) else rope_deltas
    deltas = deltas.reshape(-1).astype(mx.int32)
    B = batch if batch is not None else deltas.shape[0]
    pos = mx.arange(length, dtype=mx.int32) + start
    pos = pos[None, :] + deltas[:, None]  # [B or 1, length]
    return mx.broadcast_to(pos[None], (3, B, length))


def no_delta(rope_deltas: int | mx.array) -> bool:
    """Whether every row's rope delta is 0 (text positions are then the cache indices themselves)."""
    return not bool(mx.any(mx.array(rope_deltas) != 0).item())
