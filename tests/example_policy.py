"""A policy written outside kvjax, as a user would in their own file (README, "Write your own policy").

Registering it puts it in `kvjax.policies.names()`, so the test suite's
property matrix and generate tests run it like a built-in policy.
"""

import dataclasses

import jax.numpy as jnp

from kvjax.policies import ScorerPolicy, register


@register
@dataclasses.dataclass(frozen=True)
class ValueNorm(ScorerPolicy):
    """Keeps the last `window` tokens and those whose values have the largest L2 norm."""

    window: int = 1
    name = "value_norm"

    def score(self, cand, step, layer):
        norms = jnp.linalg.norm(cand.v_new.astype(jnp.float32), axis=-1)  # [B, H, S] of the new tokens
        return jnp.concatenate([cand.score[..., : cand.num_cache], norms], axis=-1)  # kept slots keep theirs
