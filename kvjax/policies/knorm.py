"""Key-norm scoring (Devoto et al., arXiv 2406.11430).

Score: -||k||_2 of the stored key (low key norm correlates with high
attention), fixed when the token arrives. Keeps: the `capacity` keys of
smallest norm; needs no attention weights.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.scorer import ScorerPolicy


@dataclasses.dataclass(frozen=True)
class KNorm(ScorerPolicy):
    name = "knorm"

    def score(self, cand, step, layer):
        norms = jnp.linalg.norm(cand.k_new.astype(jnp.float32), axis=-1)
        return jnp.concatenate([cand.score[..., : cand.num_cache], -norms], axis=-1)
