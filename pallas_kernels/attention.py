"""`cache_attention` on Pallas kernels: two regions (cache slots, the chunk), merged by log-sum-exp.

Decode (one query token) and chunked prefill share one kernel per backend with
two configurations: for decode the few rows of a KV group are one program and
the capacity axis is split across programs (flash-decoding, so a single
sequence fills the chip); for prefill the rows are blocked and the chunk region
is causal. Same signature and results as `reference.cache_attention_reference`.

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
from pallas_kernels.region import Region
from pallas_kernels.shapes import Array, Bool, Float, Int

BACKENDS = {"gpu": gpu.region_attention, "tpu": tpu.region_attention}


def default_backend() -> str:
    """The kernel variant for this platform: TPU on TPU, the GPU variant otherwise (CPU interprets it)."""
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def _blocks(backend: str, rows: int, n: int, block_r: int | None, block_k: int | None) -> tuple[int, int]:
    """Default block sizes: powers of two for Triton; on TPU multiples of (8, 128) or the whole axis."""
    if backend == "gpu":
        block_r = block_r or min(64, max(16, pl.next_power_of_2(rows)))
        block_k = min(block_k or 64, max(16, pl.next_power_of_2(n)))
    else:
        block_r = block_r or (rows if rows <= 256 else 256)
        block_k = block_k or 512
        block_k = n if n <= block_k else block_k
    return block_r, block_k


def _splits(num_splits: int | None, batch: int, heads: int, row_blocks: int, decode: bool) -> int:
    """Flash-decoding: split the capacity until about 256 programs run (one H100 has 132 SMs)."""
    if num_splits is not None:
        return num_splits
    return max(1, 256 // (batch * heads * row_blocks)) if decode else 1


def cache_attention(
    q: Float[Array, "B H R D"],
    k_cache: Float[Array, "B H C D"],
    v_cache: Float[Array, "B H C D"],
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
    backend: str | None = None,
    interpret: bool | None = None,
    block_r: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> tuple[Float[Array, "B H R D"], Float[Array, "B H R"], Float[Array, "B H N"] | None]:
    """Kernel version of `cache_attention_reference` (same arguments and results).

    `backend` is "gpu" or "tpu" (default: this platform's); `interpret` defaults
    to True on CPU, where the kernel runs in Pallas' interpreter.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
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
    regions = [  # (keys, values, valid, positions, causal)
        (k_cache, v_cache, cache_valid, cache_pos if windowed else jnp.zeros((b, h, c), i32), False),
        (k_new, v_new, chunk_valid, jnp.broadcast_to(chunk_pos[:, None, :], (b, h, s)), True),
    ]
    parts, logits = [], []
    for keys, values, valid, pos, causal in regions:
        n = keys.shape[2]
        br, bk = _blocks(backend, rows, n, block_r, block_k)
        cfg = Region(
            group=group, causal=causal, scale=scale, softcap=softcap, max_distance=max_distance,
            return_logits=stat_weights is not None, block_r=br, block_k=bk,
            num_splits=1 if causal else _splits(num_splits, b, h, -(-rows // br), decode=s == 1),
        )
        inputs = (q, keys, values, valid[:, :, None, :].astype(i32), pos[:, :, None, :].astype(i32), row_pos, extent(valid))
        o, m, l, lg = BACKENDS[backend](inputs, cfg, interpret=interpret)
        parts.append((o, m, l))
        if lg is not None:
            logits.append(lg[..., :n])
    out, lse = combine(*(jnp.concatenate(x, axis=2) for x in zip(*parts)))
    row_valid = new_valid[:, token][:, None, :]  # padding queries see nothing
    out = jnp.where(row_valid[..., None], out, 0.0).astype(q.dtype)
    lse = jnp.where(row_valid, lse, -jnp.inf)
    mass = None
    if stat_weights is not None:
        finite = jnp.isfinite(lse)[..., None]
        p = jnp.where(finite, jnp.exp(jnp.concatenate(logits, -1) - jnp.where(finite, lse[..., None], 0.0)), 0.0)
        mass = jnp.einsum("bhrn,br->bhn", p, stat_weights.astype(jnp.float32)[:, token])
    return out, lse, mass
