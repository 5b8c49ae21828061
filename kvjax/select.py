"""Keep the best candidates in a fixed number of slots (shared by every policy).

Candidates are ordered by (rank, position): the lowest rank is evicted first,
and among equal ranks the oldest token. Two paths give the same kept set:

- `select_chunk` (prefill chunks): sort the cache slots and the chunk's tokens
  together and gather the best `slots` of them into a fresh layer, kept slots
  where they were.
- `evict_index` + `write_slot` (one new token): evict the single lowest
  candidate and write the new token over it with an in-place scatter, so a
  decode step touches one slot instead of rewriting the cache. The write's
  slot index goes through `after(index, out, ...)` so that XLA can write in
  place at all (see there).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from kvjax.cache import EMPTY_POS, LayerCache

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
    """Indices that sort candidates by position, empty ones last (in index order), as a stable argsort.

    While every position is below INT_MAX // N - 1, (position, index) packs into one int32 whose
    plain sort gives the order: XLA CPU sorts one int32 array about 5x faster than it argsorts
    (a key with an index; [3, 1025]: 84 against 422 us, JAX 0.10.2). Later positions take the argsort.
    """
    n = pos.shape[-1]
    limit = INT_MAX // n - 1  # limit * n + (n - 1) fits in an int32
    packed = lambda: lax.sort(jnp.where(valid, pos, limit) * n + jnp.arange(n, dtype=jnp.int32), dimension=-1) % n  # noqa: E731
    argsort = lambda: jnp.argsort(jnp.where(valid, pos, INT_MAX), axis=-1).astype(jnp.int32)  # noqa: E731
    return lax.cond(jnp.all(jnp.where(valid, pos, 0) < limit), packed, argsort)


def inverse(order: Int[Array, "B H N"]) -> Int[Array, "B H N"]:
    """The inverse permutation: where each index stands in `order` (a scatter, not a second sort)."""
    b, h, n = order.shape
    return jnp.zeros_like(order).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], order].set(
        jnp.broadcast_to(jnp.arange(n, dtype=order.dtype), order.shape), unique_indices=True)


def kth_largest_threshold(x: Float[Array, "*B N"], k: int) -> Float[Array, "*B 1"]:
    """The k-th largest value along the last axis (k >= 1), as `lax.top_k(x, k)[0][..., -1:]`.

    Sorted as int32 bit patterns that order like the floats (sign-flipped for negatives, -0.0 taken
    as 0.0, NaN not allowed): XLA CPU sorts int32 several times faster than f32 or than top_k
    ([3, 1025], k=128: about 90 against 300-380 us, JAX 0.10.2)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.int32)
    ordered = jnp.where(bits < 0, bits ^ INT_MAX, bits)
    kth = lax.sort(ordered, dimension=-1)[..., x.shape[-1] - k :][..., :1]
    return lax.bitcast_convert_type(jnp.where(kth < 0, kth ^ INT_MAX, kth), jnp.float32)


def select_chunk(fields: dict[str, Array], rank_: Float[Array, "B H N"], slots: int) -> dict[str, Array]:
    """Keep the `slots` best of N candidates, the first `slots` of which are the cache's slots.

    `fields` maps names to candidate arrays [B, H, N, ...] (must include
    'pos' and 'valid'). Returns the same names with N replaced by `slots`:
    a kept slot stays where it was, and kept newcomers fill the freed slots.
    """
    order = jnp.lexsort((fields["pos"], rank_), axis=-1)  # ascending: worst first
    return gather(fields, in_place(order[..., -slots:], slots))


def in_place(best: Int[Array, "B H K"], slots: int) -> Int[Array, "B H K"]:
    """The kept candidates `best` laid out so that kept slots (candidates below `slots`) keep their
    index and the other kept candidates fill the freed slots in candidate order. Slots that stay
    put are not rewritten, and formats that share statistics across slots (KIVI's key groups)
    are not quantized anew for a token that only moved."""
    b, h, _ = best.shape
    kept = jnp.zeros((b, h, slots), bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], best].set(True, mode="drop")
    newcomers = jnp.sort(best, axis=-1)  # kept slots first (indices below `slots`), then the newcomers
    free_rank = jnp.cumsum(~kept, axis=-1) - 1
    newcomer = jnp.take_along_axis(newcomers, jnp.clip(kept.sum(-1, keepdims=True) + free_rank, 0, slots - 1), -1)
    return jnp.where(kept, jnp.arange(slots), newcomer)


def trailing(x: Array, like: Array) -> Array:
    """`x` with trailing axes of size one up to `like`'s rank (to broadcast a [B, H, ...] index or mask)."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def gather(fields, index: Int[Array, "B H K"], axis: int = 2):
    """Candidates `index` along `axis` of every array in a pytree (trailing axes such as D follow)."""
    return jax.tree.map(lambda x: jnp.take_along_axis(x, trailing(index, x), axis=axis), fields)


def candidates_at(slots: Array, token: Array, index: Int[Array, "B H K"]) -> Array:
    """Candidates `index` of (the C `slots` [B, H, C, ...], then the new `token` [B, H, 1, ...] at
    index C), read without joining the two: [B, H, K, ...]."""
    c = slots.shape[2]
    return jnp.where(trailing(index == c, token), token, gather(slots, jnp.minimum(index, c - 1)))


def keep_best(lc: LayerCache, cand, score: Float[Array, "B H N"], rank_: Float[Array, "B H N"], step) -> LayerCache:
    """The layer after keeping its best-ranked candidates (`kvjax.policies.scorer.Candidates`).

    Decode (one token): evict the lowest candidate and write the new token over
    it in place. A prefill chunk: sort all candidates and gather the best.
    """
    c = lc.slots
    if cand.k_new.shape[2] == 1:
        drop = evict_index(rank_, cand.pos)
        target = after(jnp.where((drop < c) & step.new_valid, drop, c), cand.written_after, c)  # c = out of range: no write
        stored = {name: write_slot(getattr(lc, name), target, new[:, :, 0]) for name, new in cand.new_as_stored().items()}
        return lc.replace(
            **stored,
            pos=write_slot(lc.pos, target, cand.pos[..., c]),
            valid=write_slot(lc.valid, target, cand.valid[..., c]),
            score=write_slot(score[..., :c], target, score[..., c]),
        )
    return as_layer(select_chunk(cand.fields(score), rank_, c))


def as_layer(fields: dict[str, Array]) -> LayerCache:
    """A LayerCache from kept candidate fields; empty slots get position EMPTY_POS."""
    return LayerCache(**dict(fields, pos=jnp.where(fields["valid"], fields["pos"], EMPTY_POS)))


def evict_index(rank_: Float[Array, "B H N"], pos: Int[Array, "B H N"]) -> Int[Array, "B H"]:
    """Index of the candidate `select_chunk` would drop when one token arrives:
    the lowest rank, the lowest position among ties (empty slots rank -inf)."""
    lowest = rank_ == rank_.min(-1, keepdims=True)
    return jnp.argmin(jnp.where(lowest, pos, INT_MAX), axis=-1)


def write_slot(x: Array, target: Int[Array, "B H *K"], value: Array) -> Array:
    """x[b, h, target[b, h]] = value[b, h]; an out-of-range target writes nothing. With several
    targets per (b, h) (distinct, [B, H, K]) all are written by one scatter, whose operands are then
    every value read from `x`, so XLA can still write in place."""
    b, h, *k = target.shape
    ones = (1,) * len(k)
    return x.at[jnp.arange(b).reshape(b, 1, *ones), jnp.arange(h).reshape(1, h, *ones), target].set(value, mode="drop")


def after(index: Int[Array, "*I"], out, limit: int) -> Int[Array, "*I"]:
    """Slot indices `index` (each <= `limit`), unchanged, but computed from the attention output `out`
    (an array or a pytree of them: then from every one).

    A donated slot buffer is written in place only if XLA can order the write
    after every read of the buffer. Attention reads the slots before `out`
    exists, but a write whose index does not depend on `out` (a ring position,
    an eviction decided by stored scores, every value write) is not ordered
    after it, and XLA's copy insertion then copies the whole K and V buffers,
    twice, in every decode step (measured on XLA CPU, JAX 0.10.2; an
    `optimization_barrier` does not help, the CPU compiler drops it first).
    `min(index, max(limit, u))` equals `index` for any u, and XLA cannot fold
    it away, so the dependency costs one reduction over `out`.
    """
    total = sum(x.astype(jnp.float32).sum() for x in jax.tree.leaves(out))
    u = lax.shift_right_logical(lax.bitcast_convert_type(total, jnp.int32), 1)  # >= 0
    return jnp.minimum(index, jnp.maximum(limit, u))


def not_before(x, dep):
    """`x` (a pytree) unchanged, but computable only once `dep` is. Work that depends on the cache
    alone cannot then be scheduled early: XLA CPU hoisted POD's per-layer join of its slots and
    ring, KVMerger's keys in position order and BCT's key norms to the start of the step, so every
    layer's copy was alive at once (SmolLM2, 4k context, batch 8, compiled scratch memory: POD 382
    -> 14 MiB, KVMerger 205 -> 34, BCT 195 -> 19; `full` 11). The select fuses into its consumer;
    never apply it to a buffer that is then written in place (it would be a new buffer)."""
    always = after(jnp.int32(0), dep, 0) == 0  # True, but not known to XLA
    return jax.tree.map(lambda a: jnp.where(always, a, jnp.zeros_like(a)), x)


def unfused(fn: Callable, *args):
    """`fn(*args)`, computed into buffers of its own. XLA CPU fuses a cheap elementwise producer
    into each consumer and evaluates it once per consumer element: RoPE's cos and sin of a chunk's
    positions were evaluated once per head they rotate (SmolLM2, 9 query and 3 key heads, a 256-token
    chunk: 0.7-0.9 ms per layer instead of 0.14-0.18). `lax.optimization_barrier` does not stop it
    (XLA CPU removes barriers before fusion); a conditional is a fusion boundary. Both branches are
    `fn`, so the predicate (data XLA cannot fold) only keeps the conditional from being inlined."""
    pred = jax.tree.leaves(args)[0].ravel()[0] > 0
    return lax.cond(pred, fn, fn, *args)
