"""Input validation at the kernels' boundary: every message names the problem and the fix.

A wrong shape inside a Pallas kernel surfaces as an index error deep in Mosaic
or Triton, or not at all (a block read past the array is undefined memory), so
`cache_attention` checks shapes, dtypes and block sizes before tracing a kernel.
"""

from __future__ import annotations

import jax.numpy as jnp

_LAYOUT = "lay queries out as rows with kvjax.attention (einops 'b s (h g) d -> b h (s g) d')"


def _shape(name: str, x, want: tuple, meaning: str) -> None:
    if x.ndim != len(want) or any(w is not None and a != w for a, w in zip(x.shape, want)):
        shown = ", ".join("?" if w is None else str(w) for w in want)
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({shown}) = {meaning}")


def check_inputs(q, k_cache, v_cache, cache_valid, k_new, v_new, new_valid, *, group, max_distance, cache_pos, q_pos, stat_weights,
                 k_scale=None, v_scale=None) -> None:
    """Shapes and dtypes of `cache_attention`'s arguments (see its docstring for their meaning)."""
    if q.ndim != 4:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected 4 axes [batch, kv_heads, rows, head_dim]; {_LAYOUT}")
    b, h, rows, d = q.shape
    if group < 1 or rows % group:
        raise ValueError(f"q has {rows} rows, not a multiple of group={group} (query heads per KV head); {_LAYOUT}")
    s = rows // group
    _shape("k_cache", k_cache, (b, h, None, d), "[batch, kv_heads, capacity, head_dim] like q's")
    c = k_cache.shape[2]
    _shape("v_cache", v_cache, (b, h, c, d), "k_cache's shape")
    _shape("cache_valid", cache_valid, (b, h, c), "[batch, kv_heads, capacity]")
    _shape("k_new", k_new, (b, h, s, d), f"[batch, kv_heads, chunk tokens = rows / group = {s}, head_dim]")
    _shape("v_new", v_new, (b, h, s, d), "k_new's shape")
    _shape("new_valid", new_valid, (b, s), "[batch, chunk tokens]")
    for name, x in (("cache_valid", cache_valid), ("new_valid", new_valid)):
        if x.dtype != jnp.bool_:
            raise TypeError(f"{name} has dtype {x.dtype}; pass a bool mask (e.g. {name} != 0)")
    for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        if x.dtype not in WIDE:
            raise TypeError(f"{name} has dtype {x.dtype}; attention needs floating inputs (bfloat16 or float32)")
    _check_scales(k_cache, v_cache, k_scale, v_scale, (b, h, c))
    if k_cache.dtype != v_cache.dtype or k_new.dtype != v_new.dtype:
        raise TypeError(f"keys and values differ in dtype ({k_cache.dtype}/{v_cache.dtype}, {k_new.dtype}/{v_new.dtype}); cast them to one")
    if max_distance is not None:
        if cache_pos is None or q_pos is None:
            raise ValueError("max_distance (a sliding window) needs positions: pass cache_pos [batch, kv_heads, capacity] and q_pos [batch, chunk tokens]")
        _shape("cache_pos", cache_pos, (b, h, c), "[batch, kv_heads, capacity]")
        _shape("q_pos", q_pos, (b, s), "[batch, chunk tokens]")
    if stat_weights is not None:
        _shape("stat_weights", stat_weights, (b, s), "[batch, chunk tokens] (one weight per query token)")


WIDE = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
NARROW = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _check_scales(k_cache, v_cache, k_scale, v_scale, want: tuple) -> None:
    """Slots are float, or narrow (int8 / fp8, `kvjax.quant`) with one f32 scale per (row, head, slot) for k and v."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass k_scale and v_scale together (a narrow cache scales both k and v)")
    if k_scale is None:
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if x.dtype not in WIDE:
                raise TypeError(f"{name} has dtype {x.dtype}: narrow slots need their scales; pass k_scale and v_scale "
                                "[batch, kv_heads, capacity] (kvjax.quant), or float slots")
        return
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype not in WIDE + NARROW:
            raise TypeError(f"{name} has dtype {x.dtype}; slots are float32 / bfloat16, or int8 / float8_e4m3fn with scales")
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
        _shape(name, x, want, "[batch, kv_heads, capacity], one scale per slot")
        if x.dtype != jnp.float32:
            raise TypeError(f"{name} has dtype {x.dtype}; scales are float32")


def check_blocks(backend: str, block_r: int, block_k: int, rows: int, keys: int, *, compiled: bool) -> None:
    """Block sizes each backend can lower: Triton's are powers of two (at least 16 to compile);
    Mosaic's tiles are (8, 128). Pallas' interpreter takes any size, so tests may use tiny blocks."""
    for name, size in (("block_r", block_r), ("block_k", block_k)):
        if size < 1:
            raise ValueError(f"{name}={size} must be positive; leave it None for the tuned default (pallas_kernels.tuning)")
    if backend == "gpu":
        least = 16 if compiled else 1
        for name, size in (("block_r", block_r), ("block_k", block_k)):
            if size & (size - 1) or size < least:
                fix = max(least, 1 << (size - 1).bit_length())
                raise ValueError(f"{name}={size}: Triton blocks must be powers of two of at least {least}; use {name}={fix}")
    elif compiled:
        if block_k % 128 and block_k < keys:
            raise ValueError(f"block_k={block_k}: Mosaic key blocks must be multiples of 128 (lanes) or cover all {keys} keys; "
                             f"use block_k={max(128, block_k // 128 * 128)}")
        if block_r % 8 and block_r < rows:
            raise ValueError(f"block_r={block_r}: Mosaic row blocks must be multiples of 8 (sublanes) or cover all {rows} rows; "
                             f"use block_r={max(8, block_r // 8 * 8)}")
