"""SnapKV (Li et al., arXiv 2404.14469): prompt tokens voted by an observation window.

Score (prefill, per KV head): each prefix token's vote is the attention the
last `window` queries give it, averaged over those queries and summed over
the query heads of its GQA group (kvpress averages the group; same ranking),
then smoothed by average pooling (`kernel`, zero padded, stride 1) along
positions. Keeps: the whole observation window plus the best-voted prefix.

Deviations, for a fixed capacity:
- Chunked prefill: every chunk re-votes the cache and the chunk with its own
  last `window` queries; with one chunk for the whole prompt this is exactly
  the paper's selection. Pooling runs over the kept tokens in position order.
- Decode (the paper only appends): prompt tokens keep their votes; decoded
  tokens stay while within the last `window` tokens and are then the first
  evicted, oldest first, so generation slides over a fixed prompt selection.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.scorer import ScorerPolicy
from kvjax.select import position_order


def pool_by_position(x, pos, valid, kernel: int):
    """Average-pool `x` [..., N] along increasing `pos` (invalid entries last, zero)."""
    order = position_order(pos, valid)
    xs = jnp.take_along_axis(jnp.where(valid, x, 0.0), order, axis=-1)
    pad = kernel // 2
    xp = jnp.pad(xs, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    n = x.shape[-1]
    pooled = sum(xp[..., i : i + n] for i in range(kernel)) / kernel
    return jnp.take_along_axis(pooled, jnp.argsort(order, axis=-1), axis=-1)


def observation_weights(step, window: int):
    """Prefill only: the last `window` valid queries of the chunk, each weighted 1/count (their mean)."""
    if not step.prefill:
        return None
    from_end = jnp.cumsum(step.new_valid[:, ::-1], axis=-1)[:, ::-1]
    obs = step.new_valid & (from_end <= window)
    return obs / jnp.maximum(obs.sum(-1, keepdims=True), 1)


@dataclasses.dataclass(frozen=True)
class SnapKV(ScorerPolicy):
    window: int = 64  # observation window (kvpress default)
    kernel: int = 5

    name = "snapkv"

    def __post_init__(self):
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be an odd int >= 1, got {self.kernel!r}")
        super().__post_init__()

    @property
    def protected_description(self) -> str:
        return f"sinks={self.sinks} + observation window={self.window}"

    def stat_weights(self, step):
        return observation_weights(step, self.window)

    def score(self, cand, step, layer):
        if not step.prefill:
            return jnp.where(cand.is_new, -1.0, cand.score)
        prefix = cand.valid & (cand.pos < (step.seen_after - self.window)[:, None, None])
        pooled = pool_by_position(jnp.where(prefix, cand.mass, 0.0), cand.pos, cand.valid, self.kernel)
        return jnp.where(prefix, pooled, cand.mass)
