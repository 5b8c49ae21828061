"""Keep the best candidates in a fixed number of slots (shared by every policy).

Candidates are ordered by (rank, position): the lowest rank is evicted first,
and among equal ranks the oldest token. Two paths give the same kept set:

- `select_chunk` (prefill chunks): sort the cache slots and the chunk's tokens
  together and gather the best `slots` of them into a fresh layer.
- `evict_index` + `write_slot` (one new token): evict the single lowest
  candidate and write the new token over it with an in-place scatter, so a
  decode step touches one slot instead of rewriting the cache.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

INT_MAX = jnp.iinfo(jnp.int32).max
FINITE = 1e30  # scores are clipped into (-FINITE, FINITE); +-inf are reserved


def rank(
    score: Float[Array, "B H N"], valid: Bool[Array, "B H N"], protected: Bool[Array, "B H N"]
) -> Float[Array, "B H N"]:
    """Eviction priority: +inf for protected tokens, -inf for empty candidates."""
    r = jnp.clip(score.astype(jnp.float32), -FINITE, FINITE)
    r = jnp.where(protected, jnp.inf, r)
    return jnp.where(valid, r, -jnp.inf)


def position_order(pos: Int[Array, "B H N"], valid: Bool[Array, "B H N"]) -> Int[Array, "B H N"]:
    """Indices that sort candidates by position, empty ones last."""
    return jnp.argsort(jnp.where(valid, pos, INT_MAX), axis=-1)


def select_chunk(fields: dict[str, Array], rank_: Float[Array, "B H N"], slots: int) -> dict[str, Array]:
    """Keep the `slots` best of N candidates.

    `fields` maps names to candidate arrays [B, H, N, ...] (must include
    'pos' and 'valid'). Returns the same names with N replaced by `slots`.
    """
    order = jnp.lexsort((fields["pos"], rank_), axis=-1)  # ascending: worst first
    keep = order[..., -slots:]
    out = {}
    for name, x in fields.items():
        idx = keep if x.ndim == keep.ndim else keep[..., None]
        out[name] = jnp.take_along_axis(x, idx, axis=2)
    return out


def evict_index(rank_: Float[Array, "B H N"], pos: Int[Array, "B H N"]) -> Int[Array, "B H"]:
    """Index of the candidate `select_chunk` would drop when one token arrives:
    the lowest rank, the lowest position among ties (empty slots rank -inf)."""
    lowest = rank_ == rank_.min(-1, keepdims=True)
    return jnp.argmin(jnp.where(lowest, pos, INT_MAX), axis=-1)


def write_slot(x: Array, target: Int[Array, "B H"], value: Array) -> Array:
    """x[b, h, target[b, h]] = value[b, h]; an out-of-range target writes nothing."""
    b, h = target.shape
    return x.at[jnp.arange(b)[:, None], jnp.arange(h)[None, :], target].set(value, mode="drop")
