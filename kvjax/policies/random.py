"""Random eviction, the control: each token draws a uniform score when it
arrives (from the chunk's PRNG key and the layer), so the kept set is a
uniformly random subset, reproducible for a fixed key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.policies.scorer import ScorerPolicy


@dataclasses.dataclass(frozen=True)
class Random(ScorerPolicy):
    name = "random"

    def score(self, cand, step, layer):
        draws = jax.random.uniform(jax.random.fold_in(step.key, layer), cand.k_new.shape[:3])
        return jnp.concatenate([cand.score[..., : cand.num_cache], draws], axis=-1)
