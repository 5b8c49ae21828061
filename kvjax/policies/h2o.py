"""H2O, Heavy-Hitter Oracle (Zhang et al., arXiv 2306.14048).

Score: accumulated attention S_j = sum over all queries so far of
softmax(q_i K^T)_j, per KV head (summed over the query heads of a GQA group).
A new token starts with the attention it receives in its own chunk; kept
tokens carry their score on. Keeps: the `window` most recent tokens (default
capacity // 2, the paper's 50/50 split) plus the top heavy hitters, per head.
"""

from __future__ import annotations

import dataclasses

from kvjax.policies.base import derive_defaults
from kvjax.policies.scorer import ScorerPolicy, every_query


@dataclasses.dataclass(frozen=True)
class H2O(ScorerPolicy):
    window: int | None = None

    name = "h2o"

    def __post_init__(self):
        derive_defaults(self, window=lambda c: c // 2)
        super().__post_init__()

    def stat_weights(self, step):
        return every_query(step)

    def score(self, cand, step, layer):
        return cand.score + cand.mass
