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
Cost: a token reads the keys once (its victim's similarity to every slot) and
writes at most two slots (the token, the merged pair) with one in-place scatter.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import select
from kvjax.policies.merging import MergingPolicy, cosine


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
        return self._insert_all({name: x[:, :, :slots] for name, x in fields.items()},
                                {name: x[:, :, slots:] for name, x in fields.items()})

    def keep(self, lc, cand, score, rank, step):
        """As `merge`, from the layer's slots and the chunk as they are (no candidate arrays built)."""
        c = lc.slots
        cache = dict(k=lc.k, v=lc.v, pos=lc.pos, valid=lc.valid, score=score[..., :c])
        chunk = dict(cand.new_as_stored(), pos=cand.pos[..., c:], valid=cand.valid[..., c:], score=score[..., c:])
        return lc.replace(**self._insert_all(cache, chunk, cand.written_after))

    def _insert_all(self, cache, chunk, written_after=None):
        """Insert the chunk's tokens [B, H, S, ...] one at a time; a single token (decode) without a scan,
        its writes ordered after `written_after` so that they land in place (`kvjax.select.after`)."""
        if chunk["pos"].shape[2] == 1:
            return self._insert(cache, {name: x[:, :, 0] for name, x in chunk.items()}, written_after)
        cache, _ = jax.lax.scan(lambda cache, tok: (self._insert(cache, tok), None), cache,
                                {name: jnp.moveaxis(x, 2, 0) for name, x in chunk.items()})
        return cache

    def _insert(self, cache, tok, written_after=None):
        """Insert one token per (row, head): into a free slot, else merge as the module says."""
        c = cache["k"].shape[2]
        pos = jnp.concatenate([cache["pos"], tok["pos"][..., None]], -1)  # the C slots, then the token
        valid = jnp.concatenate([cache["valid"], tok["valid"][..., None]], -1)
        movable = valid & (pos >= self.sinks) & (pos <= tok["pos"][..., None] - self.window)  # outside the recent window
        pick = lambda name, i: select.candidates_at(cache[name], tok[name][:, :, None], i[..., None])[:, :, 0]  # noqa: E731
        victim = jnp.argmax(jnp.where(movable, pos, -1), -1)  # the newest movable token
        vk = pick("k", victim)[:, :, None]
        keys = cache["k"] if written_after is None else select.not_before(cache["k"], written_after)  # layer by layer
        sim = jnp.concatenate([cosine(vk, keys), cosine(vk, tok["k"][:, :, None])], -1)
        others = movable & (jnp.arange(c + 1) != victim[..., None])
        target = jnp.argmax(jnp.where(others, sim, -jnp.inf), -1)
        n_t, n_v = pick("score", target), pick("score", victim)
        share = (n_t / (n_t + n_v))[..., None]
        mean = lambda name: (share * pick(name, target) + (1 - share) * pick(name, victim)).astype(cache[name].dtype)  # noqa: E731
        merged = dict(k=mean("k"), v=mean("v"), pos=jnp.maximum(pick("pos", target), pick("pos", victim)),
                      valid=jnp.ones_like(victim, bool), score=n_t + n_v)
        free = ~cache["valid"]
        has_free = free.any(-1)
        to_new = jnp.where(tok["valid"], jnp.where(has_free, jnp.argmax(free, -1), victim), c)  # c: out of range, no write
        to_merge = jnp.where(tok["valid"] & ~has_free, target, c)
        targets = jnp.stack([to_new, to_merge], -1)
        if written_after is not None:
            targets = select.after(targets, written_after, c)
        return {n: select.write_slot(x, targets, jnp.stack([tok[n], merged[n]], 2)) for n, x in cache.items()}
