"""The uncompressed reference: every token keeps its slot.

`capacity` must be at least the prompt plus the generated tokens; `check_length`
raises rather than silently evicting.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax import select
from kvjax.cache import LayerCache
from kvjax.policies.base import Step
from kvjax.policies.scorer import Candidates, ScorerPolicy


@dataclasses.dataclass(frozen=True)
class Full(ScorerPolicy):
    """Keeps: everything. Scores: none. capacity = the longest sequence."""

    name = "full"

    def check_length(self, tokens: int, what: str = "prompt + max_new_tokens") -> None:
        if self.capacity < tokens:
            raise ValueError(
                f"policy {self.name!r} never evicts but capacity={self.capacity} < {what} = {tokens}; "
                f"raise its capacity to at least {tokens}"
            )

    def keep(self, lc: LayerCache, cand: Candidates, score, rank, step: Step) -> LayerCache:
        """The chunk's valid tokens in the next free slots, in order, by one in-place scatter.

        Nothing is evicted, so this keeps what the scorer tier's `keep_best` keeps, without
        sorting and gathering the cache (a 256-token prefill chunk of SmolLM2 spent about 1 ms
        per layer there), and the valid slots stay a prefix of each row's slots in position
        order, even with padding (`keep_best` may leave holes), which is what lets prefill
        attention read only the filled slots (`pallas_kernels.reference.cache_prefixes`)."""
        c = lc.slots
        new_valid = step.new_valid[:, None, :]  # [B, 1, S]
        target = lc.valid.sum(-1, keepdims=True, dtype=jnp.int32) + jnp.cumsum(new_valid, -1, dtype=jnp.int32) - 1
        target = select.after(jnp.where(new_valid, target, c), cand.written_after, c)  # [B, H, S]; c writes nothing
        stored = {name: select.write_slot(getattr(lc, name), target, new) for name, new in cand.new_as_stored().items()}
        return lc.replace(**stored, pos=select.write_slot(lc.pos, target, cand.pos[..., c:]),
                          valid=select.write_slot(lc.valid, target, cand.valid[..., c:]),
                          score=select.write_slot(lc.score, target, score[..., c:]))
