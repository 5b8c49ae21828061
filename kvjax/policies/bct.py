"""BCT, Bounded-Cache Transformer (arXiv 2411.15785): a predefined capacity, updated by merging.

The paper fixes the cache length and "dynamically updates" the key/value
sequences inside it (Sec. 3), but its update rule is not published.
Our rule, which we can defend from that text: keep the first `sinks` tokens
and the last `window` tokens; when the cache is full, the token that must make
room (the incoming token when `window=0`, otherwise the one leaving the recent
window) is *merged* into its most similar unprotected slot (cosine of keys)
instead of being dropped. A slot's `score` counts the tokens it stands for and
a merge is the count-weighted mean of keys and of values, so a slot holds the
mean of its members; its position becomes the newest member's. Keys are merged
after RoPE (at their original positions), an approximation. Tokens of a chunk
are inserted one at a time (`lax.scan`), so prefill and decode follow the same rule.
Cost: a decode step builds the layer anew from the slots and the token (the
merging tier's candidates), a copy of the layer's K/V that eviction policies,
writing one slot in place, do not pay.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.merging import MergingPolicy, cosine
from kvjax.select import gather, write_slot


@dataclasses.dataclass(frozen=True)
class BCT(MergingPolicy):
    """Keeps: sinks + recent window + merged slots. Scores: member count per slot."""

    sinks: int = 4
    window: int = 0

    name = "bct"

    @property
    def min_capacity(self) -> int:
        return self.sinks + self.window + 1  # at least one slot to merge into

    @property
    def protected_description(self) -> str:
        return f"sinks={self.sinks} + window={self.window} + 1 slot to merge into"

    def score(self, cand, step, layer):
        return jnp.where(cand.is_new, 1.0, cand.score)  # a new token stands for itself

    def merge(self, fields, cand, step, slots):
        c = slots
        cache = {name: x[:, :, :c] for name, x in fields.items()}
        chunk = {name: jnp.moveaxis(x[:, :, c:], 2, 0) for name, x in fields.items()}  # scan over the chunk
        cache, _ = jax.lax.scan(self._insert, cache, chunk)
        return cache

    def _insert(self, cache, tok):
        """Insert one token per (row, head): into a free slot, else merge as the module says."""
        c = cache["k"].shape[2]
        cand = {n: jnp.concatenate([x, tok[n][:, :, None]], 2) for n, x in cache.items()}  # C slots + the token
        pick = lambda x, i: gather(x, i[..., None])[:, :, 0]  # noqa: E731
        old = cand["pos"] <= tok["pos"][..., None] - self.window  # outside the recent window
        movable = cand["valid"] & (cand["pos"] >= self.sinks) & old
        victim = jnp.argmax(jnp.where(movable, cand["pos"], -1), -1)  # the newest movable token
        sim = cosine(pick(cand["k"], victim)[:, :, None], cand["k"])
        others = movable & (jnp.arange(c + 1) != victim[..., None])
        target = jnp.argmax(jnp.where(others, sim, -jnp.inf), -1)
        n_t, n_v = pick(cand["score"], target), pick(cand["score"], victim)
        share = (n_t / (n_t + n_v))[..., None]
        mean = lambda x: (share * pick(x, target) + (1 - share) * pick(x, victim)).astype(x.dtype)  # noqa: E731
        merged = dict(k=mean(cand["k"]), v=mean(cand["v"]), pos=jnp.maximum(pick(cand["pos"], target), pick(cand["pos"], victim)),
                      valid=jnp.ones_like(victim, bool), score=n_t + n_v)
        free = ~cache["valid"]
        has_free = free.any(-1)
        skip = jnp.full_like(victim, c)  # an out-of-range slot: no write
        to_new = jnp.where(tok["valid"], jnp.where(has_free, jnp.argmax(free, -1), victim), skip)
        to_merge = jnp.where(tok["valid"] & ~has_free, target, skip)
        return {n: write_slot(write_slot(x, to_new, tok[n]), to_merge, merged[n]) for n, x in cache.items()}, None
