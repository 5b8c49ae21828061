"""TOVA, Token Omission Via Attention (Oren et al., arXiv 2401.06104).

Score: the attention the current (last) query gives each token, averaged over
all query heads of the layer; not accumulated. All KV heads of a layer keep
the same tokens. Keeps: the last token (window=1, as kvpress) plus the best.
With a prefill chunk the chunk's last query scores (exact for chunk size 1).

On a mesh whose `model` axis splits the KV heads, the mean over heads is the
one policy step that crosses devices: XLA turns the sum over the KV-head axis
into a single all-reduce of [rows, candidates] floats per layer (the mass,
already summed within each KV group); no mass or cache buffer is gathered.
"""

from __future__ import annotations

import dataclasses

from kvjax.policies.scorer import ScorerPolicy, last_query


@dataclasses.dataclass(frozen=True)
class TOVA(ScorerPolicy):
    window: int = 1

    name = "tova"

    def stat_weights(self, step):
        return last_query(step)

    def score(self, cand, step, layer):
        # mass is summed over the query heads of each KV group; summing over the
        # KV heads covers every query head of the layer.
        heads = cand.mass.shape[1]
        mean = cand.mass.sum(axis=1, keepdims=True) / (heads * cand.group)
        return mean.repeat(heads, axis=1)
