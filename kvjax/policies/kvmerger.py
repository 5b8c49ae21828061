"""KVMerger (Wang et al., arXiv 2407.08454): adaptive merging of consecutive similar keys.

Per layer and KV head, candidates (the cache slots and the chunk) are ordered by
position. Merging sets are runs of consecutive candidates whose neighbouring
keys are similar (cosine); the threshold is chosen so the number of sets equals
the slots exactly: the (n - slots) most similar eligible neighbour pairs are
joined (the paper's threshold at the (T-C)-th largest similarity, Sec. 3.2; no binary search, no
data-dependent shapes: set ids are a cumulative sum, reductions are segment sums).
The `protect` tokens with the highest accumulated attention (H2O's score) and
the `sinks`/`window` tokens are singletons.

Each set becomes one slot (Eq. 5-7): the pivot is the member
with the highest accumulated attention; weights w_i ∝ exp(-‖k_p - k_i‖² / 2σ²)
(normalised over the set, so the pivot's is the largest) merge keys and values
alike. σ: "mean" (our reading of Eq. 7, mean ‖k_p - k_i‖ / √2 over the set) or a
number. The slot keeps the pivot's position and the set's summed score.

Beyond the paper (prefill only there): the same rule runs at every step, so in
the fixed-capacity decode loop the incoming token joins its neighbour's set if
that is the most similar pair, otherwise the most similar pair elsewhere merges.
When protected tokens leave too few eligible pairs, the lowest-scoring sets are
evicted. Excluded layers (default the first two and the last, as the paper's
Sec. 4.1 setup) never merge: they evict by accumulated attention (H2O) at the
same capacity. Negative layer indices count from the model's last layer.
Cost: a prefill chunk rebuilds the layer's slots from all candidates. A decode
step (one token, so at most one join) finds the most similar eligible neighbour
pair through one sort of the positions and one pass over the keys, and writes
at most two slots in place (the merged pair, the token); which slot holds
which set differs from the rebuild's layout, the kept sets do not. Excluded
layers write one slot in place.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax import select
from kvjax.policies.base import derive_defaults
from kvjax.policies.h2o import H2O
from kvjax.policies.merging import MergingPolicy, neighbour_cosine
from kvjax.policies.scorer import every_query


@dataclasses.dataclass(frozen=True)
class KVMerger(MergingPolicy):
    """Keeps: merged runs of similar keys, top-`protect` attention tokens as singletons."""

    protect: int | None = None  # default capacity // 8
    sigma: float | str = "mean"
    exclude_layers: tuple[int, ...] = (0, 1, -1)
    num_layers: int = 0  # 0: the model's

    name = "kvmerger"

    def __post_init__(self):
        derive_defaults(self, protect=lambda c: c // 8)
        object.__setattr__(self, "exclude_layers", tuple(self.exclude_layers))
        super().__post_init__()
        if not (self.sigma == "mean" or (isinstance(self.sigma, (int, float)) and self.sigma > 0)):
            raise ValueError(f"kvmerger: sigma must be 'mean' or a positive number, got {self.sigma!r}")

    @property
    def min_capacity(self) -> int:
        return self.sinks + self.window + self.protect + 1

    @property
    def protected_description(self) -> str:
        return f"sinks={self.sinks} + window={self.window} + protect={self.protect} + 1 merged slot"

    def resolve(self, spec):
        if self.num_layers and self.num_layers != spec.num_layers:
            raise ValueError(f"kvmerger was made for num_layers={self.num_layers}, the model has {spec.num_layers}")
        excluded = {i % spec.num_layers for i in self.exclude_layers if -spec.num_layers <= i < spec.num_layers}
        return tuple(H2O(capacity=self.capacity) if i in excluded else self for i in range(spec.num_layers))

    def stat_weights(self, step):
        return every_query(step)

    def score(self, cand, step, layer):
        return cand.score + cand.mass  # accumulated attention, as H2O

    def protected_sets(self, pos, valid, score, step):
        """Candidates that stay singletons: sinks, the recent window, the `protect` highest scores."""
        return self.protected(pos, valid, step) | _top(score, valid, self.protect)

    def keep(self, lc, cand, score, rank, step):
        if cand.k_new.shape[2] == 1:
            return self._join_one(lc, cand, score, step)
        return super().keep(lc, cand, score, rank, step)

    def merge(self, fields, cand, step, slots):
        f = select.gather(fields, select.position_order(fields["pos"], fields["valid"]))
        protected = self.protected_sets(f["pos"], f["valid"], f["score"], step)
        merged = jax.vmap(jax.vmap(lambda g: _merge_runs(g, slots, self.sigma)))(dict(f, protected=protected))
        rank = select.rank(merged["score"], merged["valid"], merged.pop("protected"))
        return select.select_chunk(merged, rank, slots)

    def _join_one(self, lc, cand, score, step):
        """`merge`'s rule for one new token, written in place. With C slots full and a valid token
        there is one join: the most similar eligible neighbour pair (in position order) becomes one
        slot, and the token takes the other's slot unless it is in the pair. Without an eligible
        pair the lowest-ranked candidate is evicted, as `merge` does; with a free slot, nothing joins."""
        c = lc.slots
        valid, pos = cand.valid, cand.pos
        protected = self.protected_sets(pos, valid, score, step)
        new = {name: x[:, :, 0] for name, x in cand.new_as_stored().items()}
        order = select.not_before(select.position_order(pos, valid), cand.written_after)  # [B, H, C+1]; layer by layer
        k_sorted = select.candidates_at(lc.k, new["k"][:, :, None], order)
        sim = neighbour_cosine(k_sorted)
        free = jnp.take_along_axis(valid & ~protected, order, -1)
        eligible = free[..., :-1] & free[..., 1:]
        first = jnp.argmax(jnp.where(eligible, sim, -jnp.inf), -1)[..., None]  # the most similar, the earliest among ties
        join = (valid.sum(-1) > c) & eligible.any(-1)
        pair = jnp.take_along_axis(order, jnp.concatenate([first, first + 1], -1), -1)  # [B, H, 2], by position
        merged = _merge_pair({name: select.candidates_at(getattr(lc, name), new[name][:, :, None], pair) for name in ("k", "v")},
                             jnp.take_along_axis(score, pair, -1), self.sigma)
        pivot = jnp.take_along_axis(pair, merged.pop("pivot")[..., None], -1)  # [B, H, 1]: the candidate whose position the set keeps
        merged.update(pos=jnp.take_along_axis(pos, pivot, -1)[..., 0], valid=jnp.ones_like(join))
        token = dict(new, pos=pos[..., c], valid=valid[..., c], score=score[..., c])
        evict = select.evict_index(select.rank(score, valid, protected), pos)  # c: the token itself
        to_new = jnp.where(token["valid"], jnp.where(join, pair.max(-1), evict), c)  # c: no write; pair.max() == c: it joined
        to_merged = jnp.where(join, pair.min(-1), c)
        target = select.after(jnp.stack([to_new, to_merged], -1), cand.written_after, c)
        slots = dict({name: getattr(lc, name) for name in new}, pos=lc.pos, valid=lc.valid, score=score[..., :c])
        return lc.replace(**{name: select.write_slot(x, target, jnp.stack([token[name], merged[name]], 2))
                             for name, x in slots.items()})


def _merge_pair(kv, score, sigma):
    """Two neighbours [B, H, 2, ...] merged as `_merge_runs` merges a set of two: towards the pivot
    (the higher score, the first on a tie), Gaussian weights of the key distance."""
    k32 = kv["k"].astype(jnp.float32)
    pivot = jnp.where(score[..., 0] >= score[..., 1], 0, 1)  # [B, H]
    kp = jnp.take_along_axis(k32, pivot[..., None, None], -2)
    d2 = ((k32 - kp) ** 2).sum(-1)  # [B, H, 2], the pivot's 0
    sig = (jnp.sqrt(d2).sum(-1, keepdims=True) / 2.0 / math.sqrt(2.0)) if sigma == "mean" else jnp.full_like(d2, float(sigma))
    g = jnp.where(d2 > 0, jnp.exp(-d2 / (2 * jnp.maximum(sig, 1e-30) ** 2)), 1.0)
    w = (g / g.sum(-1, keepdims=True))[..., None]
    mix = lambda x: (w[..., 0, :] * x[..., 0, :].astype(jnp.float32) + w[..., 1, :] * x[..., 1, :].astype(jnp.float32)).astype(x.dtype)  # noqa: E731
    return dict(k=mix(kv["k"]), v=mix(kv["v"]), score=score[..., 0] + score[..., 1], pivot=pivot)


def _top(score, valid, k: int):
    """The k valid candidates with the highest score."""
    if k == 0:
        return jnp.zeros_like(valid)
    s = jnp.where(valid, score, -jnp.inf)
    return valid & (s >= select.kth_largest_threshold(s, k))


def _merge_runs(f, slots: int, sigma):
    """One (row, head): join the most similar eligible neighbours until `slots` sets remain, merge each set."""
    n = f["valid"].shape[0]
    k32 = f["k"].astype(jnp.float32)
    sim = neighbour_cosine(k32)
    free = f["valid"] & ~f["protected"]
    eligible = free[:-1] & free[1:]
    joins = jnp.maximum(f["valid"].sum() - slots, 0)
    order = jnp.argsort(jnp.where(eligible, -sim, jnp.inf), stable=True)
    join = eligible & (jnp.zeros(n - 1, jnp.int32).at[order].set(jnp.arange(n - 1)) < joins)
    seg = jnp.cumsum(jnp.concatenate([jnp.ones(1, bool), ~join])) - 1  # set id per candidate
    segsum = lambda x: jax.ops.segment_sum(x, seg, num_segments=n)  # noqa: E731
    score = jnp.where(f["valid"], f["score"], -jnp.inf)
    best = jax.ops.segment_max(score, seg, num_segments=n)[seg]
    pivot = jax.ops.segment_min(jnp.where(score == best, jnp.arange(n), n), seg, num_segments=n)  # first best
    d2 = ((k32 - k32[pivot[seg]]) ** 2).sum(-1)
    if sigma == "mean":
        size = jnp.maximum(segsum(jnp.ones(n)), 1.0)
        sig = (segsum(jnp.sqrt(d2)) / size / math.sqrt(2.0))[seg]
    else:
        sig = jnp.full(n, float(sigma))
    g = jnp.where(d2 > 0, jnp.exp(-d2 / (2 * jnp.maximum(sig, 1e-30) ** 2)), 1.0)
    w = g / segsum(g)[seg]
    return dict(
        k=segsum(w[:, None] * k32).astype(f["k"].dtype),
        v=segsum(w[:, None] * f["v"].astype(jnp.float32)).astype(f["v"].dtype),
        pos=f["pos"][jnp.minimum(pivot, n - 1)],  # empty sets (ids past the last) point anywhere
        valid=segsum(f["valid"].astype(jnp.int32)) > 0,
        score=segsum(jnp.where(f["valid"], f["score"], 0.0)),
        protected=segsum(f["protected"].astype(jnp.int32)) > 0,
    )
