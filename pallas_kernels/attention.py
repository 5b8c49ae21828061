"""`cache_attention` on Pallas kernels: two regions (cache slots, the chunk), merged by log-sum-exp.

Decode (one query token) and chunked prefill share one kernel per backend with
two configurations: for decode the few rows of a KV group are one program and
the capacity axis is split across programs (flash-decoding, so a single
sequence fills the chip); for prefill the rows are blocked and the chunk region
is causal. Same signature and results as `reference.cache_attention_reference`.

The attention mass a scoring policy needs is a second, light kernel per region
(`region_mass`) that reads K again once every row's final lse is known; no
[rows, keys] array is ever written to memory.

Narrow slots: `k_cache` / `v_cache` may be int8 or fp8 with per-slot f32
`k_scale` / `v_scale` (`kvjax.quant`); the kernels read them as stored and
apply the scales inside (`blocks.scores`, `blocks.online_update`).

Positions: cached keys already carry RoPE at their slot's position (or at the
cache position, for policies that re-rotate), so the kernels never rotate;
positions enter only through `max_distance` (sliding-window layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gpu, tpu
from pallas_kernels.blocks import combine, extent
from pallas_kernels.checks import check_blocks, check_inputs
from pallas_kernels.region import Region
from pallas_kernels.shapes import Array, Bool, Float, Int
from pallas_kernels.tuning import blocks_for, target_platform

BACKENDS = {"gpu": gpu, "tpu": tpu}  # each module: region_attention and region_mass


def default_backend() -> str:
    """The kernel variant for the target platform: TPU on TPU, the GPU variant otherwise (CPU interprets it)."""
    return "tpu" if target_platform() == "tpu" else "gpu"


def _blocks(backend: str, rows: int, n: int, block_r: int | None, block_k: int | None, compiled: bool) -> tuple[int, int]:
    """Block sizes: the tuning table's unless given, made legal for the axis they tile (Triton:
    powers of two, at most the axis rounded up; Mosaic: the whole axis when it is shorter)."""
    tuned = blocks_for(backend)
    block_r, block_k = block_r or tuned.block_r, block_k or tuned.block_k
    check_blocks(backend, block_r, block_k, rows, n, compiled=compiled)
    if backend == "gpu":
        return min(block_r, max(16, pl.next_power_of_2(rows))), min(block_k, max(16, pl.next_power_of_2(n)))
    return min(block_r, rows), min(block_k, n)


def _splits(num_splits: int | None, programs: int, batch: int, heads: int, row_blocks: int, decode: bool) -> int:
    """Flash-decoding: split the capacity until about `programs` programs run (the tuning table's)."""
    if num_splits is not None:
        return num_splits
    return max(1, programs // (batch * heads * row_blocks)) if decode else 1


def cache_attention(
    q: Float[Array, "B H R D"],
    k_cache: Array,
    v_cache: Array,
    cache_valid: Bool[Array, "B H C"],
    k_new: Float[Array, "B H S D"],
    v_new: Float[Array, "B H S D"],
    new_valid: Bool[Array, "B S"],
    *,
    group: int,
    scale: float,
    softcap: float | None = None,
    max_distance: int | None = None,
    cache_pos: Int[Array, "B H C"] | None = None,
    q_pos: Int[Array, "B S"] | None = None,
    stat_weights: Float[Array, "B S"] | None = None,
    k_scale: Float[Array, "B H C"] | None = None,
    v_scale: Float[Array, "B H C"] | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    block_r: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> tuple[Float[Array, "B H R D"], Float[Array, "B H R"], Float[Array, "B H N"] | None]:
    """Kernel version of `cache_attention_reference` (same arguments and results).

    `backend` is "gpu" or "tpu" (default: the target platform's, an abstract
    mesh's included); `interpret` defaults to True when compiling for CPU, where
    the kernel runs in Pallas' interpreter. Block sizes default to the tuning
    table's row for the target chip (`pallas_kernels.tuning`). With
    `stat_weights`, the per-key mass comes from a second kernel per region that
    reads K again with the final lse and writes [B, H, C + S] floats.
    """
    check_inputs(q, k_cache, v_cache, cache_valid, k_new, v_new, new_valid, group=group, max_distance=max_distance,
                 cache_pos=cache_pos, q_pos=q_pos, stat_weights=stat_weights, k_scale=k_scale, v_scale=v_scale)
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if interpret is None:
        interpret = target_platform() == "cpu"
    if interpret and backend == "tpu":
        interpret = pltpu.InterpretParams()
    b, h, rows, _ = q.shape
    c, s = k_cache.shape[2], k_new.shape[2]
    token = jnp.arange(rows) // group
    i32 = jnp.int32
    windowed = max_distance is not None
    row_pos = (q_pos[:, token] if windowed else jnp.zeros((b, rows), i32))[..., None].astype(i32)
    chunk_pos = q_pos if windowed else jnp.zeros((b, s), i32)
    chunk_valid = jnp.broadcast_to(new_valid[:, None, :], (b, h, s))
    unit = lambda n: jnp.ones((b, h, 1, n), jnp.float32)  # noqa: E731
    as_row = lambda x, n: unit(n) if x is None else x[:, :, None, :].astype(jnp.float32)  # noqa: E731
    regions = [  # (keys, values, valid, positions, causal, key and value scales)
        (k_cache, v_cache, cache_valid, cache_pos if windowed else jnp.zeros((b, h, c), i32), False,
         as_row(k_scale, c), as_row(v_scale, c)),
        (k_new, v_new, chunk_valid, jnp.broadcast_to(chunk_pos[:, None, :], (b, h, s)), True, unit(s), unit(s)),
    ]
    kernels = BACKENDS[backend]
    programs = blocks_for(backend).programs
    calls, parts = [], []
    for keys, values, valid, pos, causal, key_scale, value_scale in regions:
        br, bk = _blocks(backend, rows, keys.shape[2], block_r, block_k, compiled=not interpret)
        cfg = Region(
            group=group, causal=causal, scale=scale, softcap=softcap, max_distance=max_distance, block_r=br, block_k=bk,
            num_splits=1 if causal else _splits(num_splits, programs, b, h, -(-rows // br), decode=s == 1),
        )
        inputs = (q, keys, values, valid[:, :, None, :].astype(i32), pos[:, :, None, :].astype(i32), row_pos, extent(valid),
                  key_scale, value_scale)
        calls.append((inputs, cfg))
        parts.append(kernels.region_attention(inputs, cfg, interpret=interpret))
    out, lse = combine(*(jnp.concatenate(x, axis=2) for x in zip(*parts)))
    row_valid = new_valid[:, token][:, None, :]  # padding queries see nothing
    out = jnp.where(row_valid[..., None], out, 0.0).astype(q.dtype)
    lse = jnp.where(row_valid, lse, -jnp.inf)
    mass = None
    if stat_weights is not None:  # second pass over K with the final lse (see region.py)
        w = jnp.where(new_valid, stat_weights.astype(jnp.float32), 0.0)[:, token, None]
        mass = jnp.concatenate(
            [kernels.region_mass(inputs, (lse[..., None], w), cfg, interpret=interpret) for inputs, cfg in calls], axis=-1)
    return out, lse, mass
