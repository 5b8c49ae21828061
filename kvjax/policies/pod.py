"""POD, proximal over distant tokens (Ma et al., arXiv 2412.02252): distant keys shared across layers.

Proximal tokens (the first `sinks` and the last `window`) keep their own keys
and values in every layer, in the layer's ordinary slots. Distant tokens (those
that left the window) go to a ring of `capacity - sinks - window` slots per
layer, indexed by position, so every layer holds the same distant tokens in the
same slots (oldest overwritten first). For distant tokens only the lowest layer
of each block, per KV head, stores keys (`owners[l][h]` is the layer whose
distant keys layer l, head h reads; `owners[l][h] == l` means l stores them);
every layer stores its own values. Layer l attends with its own queries over
its proximal keys and the owner's distant keys in one masked softmax, which
equals the paper's gate g·o_P + (1-g)·o_D (Sec. 3, Eq. 3).

So non-owner layers hold no distant keys: `KVCache.state[l].k` has one row
per head that layer l owns, and the cache bytes show the saving. Blocks come
from `kvjax.calibrate.pod_blocks` (Jensen-Shannon similarity, greedy
consecutive grouping); `owners=None` gives blocks of size one (no sharing).

Which distant tokens the ring keeps is a part: `NewestRing()` (the default)
or `SnapKVRing()`, the paper's POD + SnapKV (`make("pod", select="snapkv")`): the
block owner chooses which distant tokens stay in the ring by SnapKV's votes
(the attention of the last `select_window` prompt queries, average-pooled
along positions over the distant tokens; re-voted each prefill chunk, frozen
during decode, where generated tokens leaving the window are dropped first).
Without it the ring keeps the newest tokens. Other layers of the block hold the
same tokens as their owner, found by position, with their own values.

Deviations, named: the paper keeps every distant token; with a predefined
capacity the ring must drop some. Non-owner layers run after their owner, so
in the step the owner drops a token they no longer see it either (one step
early). `train_attention` is the full-sequence path for post-training.
Cost: attention reads the slots and the ring joined into one buffer, a copy of
both per step that a kernel reading the two in place would avoid. A decode step
hands the ring only the token leaving the window, and both writes land in place.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from kvjax import select
from kvjax.attention import causal_attention, grouped_logits
from kvjax.policies.base import derive_defaults
from kvjax.policies.scorer import Candidates, ScorerPolicy, at_original_positions
from kvjax.policies.snapkv import observation_weights, pool_by_position


@struct.dataclass
class DistantCache:
    """One layer's distant ring: k [B, owned heads, R, D], v [B, H, R, D], pos, valid, score [B, H, R]."""

    k: Float[Array, "B O R D"]
    v: Float[Array, "B H R D"]
    pos: Int[Array, "B H R"]
    valid: Bool[Array, "B H R"]
    score: Float[Array, "B H R"]


@dataclasses.dataclass(frozen=True)
class NewestRing:
    """The ring keeps the newest distant tokens: every layer writes the tokens leaving the
    window at slot pos mod R, so the rings agree without looking at each other."""

    def stat_weights(self, step):
        return None

    def update(self, pod: POD, distant: tuple[DistantCache, ...], layer: int, k, v, pos, leaving, mass, step) -> DistantCache:
        d, ring = distant[layer], pod.ring_slots
        newest = jnp.where(leaving, pos, -1).max(-1, keepdims=True)
        slot = jnp.where(leaving & (pos > newest - ring), pos % ring, ring)  # ring = out of range: no write
        b, h, _ = pos.shape
        bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
        owned = jnp.asarray(pod.owned(layer, h), jnp.int32)
        return d.replace(
            k=d.k.at[bi, jnp.arange(len(owned))[None, :, None], slot[:, owned]].set(k[:, owned], mode="drop"),
            v=d.v.at[bi, hi, slot].set(v, mode="drop"),
            pos=d.pos.at[bi, hi, slot].set(pos, mode="drop"),
            valid=d.valid.at[bi, hi, slot].set(True, mode="drop"),
        )


@dataclasses.dataclass(frozen=True)
class SnapKVRing:
    """POD + SnapKV (arXiv 2412.02252, Sec. 4): the ring keeps the distant tokens best voted by the
    last `window` prompt queries, average-pooled along positions (`kernel`), re-voted each
    prefill chunk and frozen during decode, where generated tokens leaving the window are
    dropped first. Heads a layer does not own take their owner's choice, found by position."""

    window: int = 64
    kernel: int = 5

    def stat_weights(self, step):
        return observation_weights(step, self.window)

    def update(self, pod: POD, distant: tuple[DistantCache, ...], layer: int, k, v, pos, leaving, mass, step) -> DistantCache:
        d = distant[layer]
        heads = d.v.shape[1]
        cpos = jnp.concatenate([d.pos, pos], 2)
        cvalid = jnp.concatenate([d.valid, leaving], 2)
        if step.prefill:  # re-vote ring and leaving tokens, pooled along positions
            score = pool_by_position(jnp.where(cvalid, mass, 0.0), cpos, cvalid, self.kernel)
        else:  # decode: the prompt's votes stay; generated tokens leaving the window are dropped first
            score = jnp.concatenate([d.score, jnp.full(pos.shape, -1.0)], 2)
        rank = select.rank(score, cvalid, jnp.zeros_like(cvalid))
        keep = jnp.lexsort((cpos, rank), axis=-1)[..., -pod.ring_slots :]
        cv = jnp.concatenate([d.v, v], 2)
        new = dict(select.gather(dict(v=cv, pos=cpos, valid=cvalid, score=score), keep))
        owner_of = pod.owner(layer, heads)
        mirror = [h for h, o in enumerate(owner_of) if o != layer]
        if mirror:
            theirs = lambda field: jnp.stack([getattr(distant[owner_of[h]], field)[:, h] for h in mirror], 1)  # noqa: E731
            target, target_ok, target_score = theirs("pos"), theirs("valid"), theirs("score")
            idx = jnp.asarray(mirror)
            match = (target[..., :, None] == cpos[:, idx, None, :]) & cvalid[:, idx, None, :]
            new["v"] = new["v"].at[:, idx].set(select.gather(cv[:, idx], jnp.argmax(match, -1)))
            new["pos"] = new["pos"].at[:, idx].set(target)
            new["valid"] = new["valid"].at[:, idx].set(target_ok & match.any(-1))
            new["score"] = new["score"].at[:, idx].set(target_score)
        owned = jnp.asarray(pod.owned(layer, heads), jnp.int32)
        new["k"] = select.gather(jnp.concatenate([d.k, k[:, owned]], 2), keep[:, owned])
        return DistantCache(**new)


@dataclasses.dataclass(frozen=True)
class POD(ScorerPolicy):
    """Keeps: sinks + window with own keys; a distant ring whose keys are shared within layer blocks."""

    sinks: int = 16  # n_s of the paper
    window: int | None = None  # default capacity // 4
    owners: tuple[tuple[int, ...], ...] | None = None  # owners[l][h], or owners[l] = (o,) for all heads
    ring: NewestRing | SnapKVRing = NewestRing()  # which distant tokens the ring keeps

    name = "pod"

    def __post_init__(self):
        derive_defaults(self, window=lambda c: c // 4)
        if self.owners is not None:
            object.__setattr__(self, "owners", tuple(tuple(int(o) for o in row) for row in self.owners))
            for layer, row in enumerate(self.owners):
                if any(not 0 <= o <= layer for o in row):
                    raise ValueError(f"pod: owners[{layer}]={row} must name layers 0..{layer} (a block's lowest layer)")
                heads = max(len(row), *(len(self.owners[o]) for o in row))
                if any(self.owner(o, heads)[h] != o for h, o in enumerate(self.owner(layer, heads))):
                    raise ValueError(f"pod: owners[{layer}]={row} names a layer that does not store its own keys")
        if not isinstance(self.ring, (NewestRing, SnapKVRing)):
            raise TypeError(f"pod: ring must be NewestRing() or SnapKVRing(...), got {self.ring!r}")
        super().__post_init__()

    @property
    def min_capacity(self) -> int:
        return self.sinks + self.window + 1

    @property
    def protected_description(self) -> str:
        return f"sinks={self.sinks} + window={self.window} + 1 distant slot"

    @property
    def ring_slots(self) -> int:
        return self.capacity - self.sinks - self.window

    @property
    def slots(self) -> int:
        return self.sinks + self.window

    def resolve(self, spec):
        if spec.sliding_windows and any(spec.sliding_windows):
            raise ValueError(f"{self.name}: models with sliding-window layers are not supported")
        if self.owners is not None and len(self.owners) != spec.num_layers:
            raise ValueError(f"pod: owners has {len(self.owners)} layers, the model has {spec.num_layers}")
        return super().resolve(spec)

    def owner(self, layer: int, kv_heads: int) -> tuple[int, ...]:
        """Per KV head, the layer whose distant keys `layer` reads (a one-entry row covers every head)."""
        row = (layer,) if self.owners is None else self.owners[layer]
        if len(row) not in (1, kv_heads):
            raise ValueError(f"pod: owners[{layer}] has {len(row)} entries; give one per KV head ({kv_heads}) or one for all")
        return row * kv_heads if len(row) == 1 else row

    def owned(self, layer: int, kv_heads: int) -> tuple[int, ...]:
        """Heads whose distant keys `layer` stores."""
        return tuple(h for h, o in enumerate(self.owner(layer, kv_heads)) if o == layer)

    def init_state(self, spec, layer: int, batch: int) -> DistantCache:
        lead = (batch, spec.kv_heads, self.ring_slots)
        dtype = jnp.dtype(spec.dtype)
        return DistantCache(
            k=jnp.zeros((batch, len(self.owned(layer, spec.kv_heads)), self.ring_slots, spec.head_dim), dtype),
            v=jnp.zeros(lead + (spec.head_dim,), dtype),
            pos=jnp.full(lead, -1, jnp.int32),
            valid=jnp.zeros(lead, bool),
            score=jnp.zeros(lead, jnp.float32),
        )

    def distant_view(self, distant: tuple[DistantCache, ...], layer: int):
        """Keys (each head's owner's key for the same token), own values, mask and positions of the ring."""
        mine = distant[layer]
        heads = mine.v.shape[1]
        if self.owned(layer, heads) == tuple(range(heads)):  # no sharing: the layer's own ring, no copy
            return mine.k, mine.v, mine.valid, mine.pos
        keys, seen = [], []
        for h, o in enumerate(self.owner(layer, heads)):
            owner_k = distant[o].k[:, self.owned(o, heads).index(h)]
            if o == layer:
                keys.append(owner_k)
                seen.append(mine.valid[:, h])
                continue
            # the owner ran first in this step: find each of our tokens in its ring (evicted ones are gone)
            theirs = distant[o]
            if isinstance(self.ring, NewestRing):  # a token sits at slot pos mod R in every ring: the same slot or gone
                keys.append(owner_k)
                seen.append(mine.valid[:, h] & theirs.valid[:, h] & (theirs.pos[:, h] == mine.pos[:, h]))
                continue
            match = (mine.pos[:, h, :, None] == theirs.pos[:, h, None, :]) & theirs.valid[:, h, None, :]
            keys.append(select.gather(owner_k, jnp.argmax(match, -1), axis=1))
            seen.append(mine.valid[:, h] & match.any(-1))
        return jnp.stack(keys, 1), mine.v, jnp.stack(seen, 1), mine.pos

    def update(self, cache, layer, q, k, v, step, attn):
        """Attend over (proximal slots, the distant ring, the chunk) in one softmax; keep
        sinks + window in the slots; tokens leaving the window may enter the ring."""
        lc = cache.layers[layer]
        q, k_rot, _, _ = at_original_positions(attn, lc, q, k, step)
        dk, dv, dvalid, dpos = select.not_before(self.distant_view(cache.state, layer), q)  # joined per layer, in turn
        c, r = lc.slots, dk.shape[2]
        out, mass = attn(q, jnp.concatenate([lc.k, dk], 2), jnp.concatenate([lc.v, dv], 2), jnp.concatenate([lc.valid, dvalid], 2),
                         k_rot, v, step, stat_weights=self.ring.stat_weights(step), cache_pos=jnp.concatenate([lc.pos, dpos], 2))
        ring_mass = None
        if mass is not None:  # mass over (slots, ring, chunk): the ring's goes first, for the ring's vote
            ring_mass = jnp.concatenate([mass[..., c : c + r], mass[..., :c], mass[..., c + r :]], -1)
            mass = jnp.concatenate([mass[..., :c], mass[..., c + r :]], -1)
        cand = Candidates.of(lc, k_rot, v, step, mass, group=q.shape[2] // lc.k.shape[1], written_after=out)
        protected = self.protected(cand.pos, cand.valid, step)
        leaving = cand.valid & ~protected
        if k.shape[1] == 1:  # decode: at most the oldest window token leaves; hand the ring only that one
            k_out, v_out, pos_out, out_ok = self._leaving_one(lc, cand, leaving)
            ring = self.ring.update(self, cache.state, layer, k_out, v_out, pos_out, out_ok, None, step)
            cand = cand._replace(written_after=(k_out, v_out))  # its slot is written after it was read
        else:
            every = cand.fields(cand.score)
            ring = self.ring.update(self, cache.state, layer, every["k"], every["v"], cand.pos, leaving, ring_mass, step)
        score = self.score(cand, step, layer)  # none: the proximal window keeps the newest
        rank = select.rank(score, cand.valid, protected)
        lc = select.keep_best(lc, cand, score, rank, step)
        return out, cache.replace_layer(layer, lc).replace_state(layer, ring)

    @staticmethod
    def _leaving_one(lc, cand: Candidates, leaving):
        """k, v [B, H, 1, D], pos and leaving [B, H, 1] of the first leaving candidate (at most one does
        in a decode step: the window moves by one token). Its index is ordered after the attention
        output (`kvjax.select.after`), so the ring's scatter can write in place."""
        c = lc.slots
        first = select.after(jnp.argmax(leaving, -1), cand.written_after, c)[..., None]  # [B, H, 1]
        at = lambda x: jnp.take_along_axis(x, first, -1)  # noqa: E731
        return (select.candidates_at(lc.k, cand.k_new, first), select.candidates_at(lc.v, cand.v_new, first),
                at(cand.pos), at(leaving))


def train_attention(
    q: Float[Array, "B T Hq D"],
    k: Float[Array, "B T H D"],
    k_owner: Float[Array, "B T H D"],
    v: Float[Array, "B T H D"],
    *,
    sinks: int,
    window: int,
    scale: float,
) -> Float[Array, "B T Hq D"]:
    """POD's full-sequence attention, for fine-tuning (the paper post-trains the model with it).

    Query i attends causally; key j uses this layer's key when it is proximal
    to i (j < sinks or j >= i - window, the cache's view at decode step i) and
    the block owner's key `k_owner` (post-RoPE, per KV head) when distant.
    Equals the decode-time cache path when the ring holds every distant token.
    """
    t = q.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    proximal = (j < sinks) | (j >= i - window)
    logits = jnp.where(proximal, grouped_logits(q, k), grouped_logits(q, k_owner))
    return causal_attention(q, k, v, scale=scale, logits=logits)
