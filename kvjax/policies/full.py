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
        """The chunk's valid tokens in the free slots, the lowest first, in chunk order, by one
        in-place scatter.

        Nothing is evicted, so this keeps what the scorer tier's `keep_best` keeps, without
        sorting and gathering the cache (a 256-token prefill chunk of SmolLM2 spent about 1 ms
        per layer there). A cache filled from empty keeps its valid slots a prefix in position
        order, even with padding (`keep_best` may leave holes), which is what lets prefill
        attention read only the filled slots (`pallas_kernels.reference.cache_prefixes`); a
        cache handed over with holes (slots masked by the caller) has them filled first."""
        c = lc.slots
        free = ~lc.valid  # [B, H, C]
        if step.new_valid.shape[1] == 1:
            target = jnp.where(free.any(-1), jnp.argmax(free, -1), c)[..., None]  # [B, H, 1]: the lowest free slot
        else:  # the n-th free slot for the n-th valid token
            free_rank = jnp.cumsum(free, -1, dtype=jnp.int32) - 1
            slot_of_rank = select.write_slot(jnp.full(free.shape, c, jnp.int32), jnp.where(free, free_rank, c),
                                             jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), free.shape))
            token_rank = jnp.cumsum(step.new_valid, -1, dtype=jnp.int32) - 1  # [B, S]
            at = jnp.broadcast_to(jnp.clip(token_rank, 0, c - 1)[:, None], (*free.shape[:2], token_rank.shape[1]))
            target = jnp.take_along_axis(slot_of_rank, at, -1)
        target = select.after(jnp.where(step.new_valid[:, None, :], target, c), cand.written_after, c)  # c writes nothing
        stored = {name: select.write_slot(getattr(lc, name), target, new) for name, new in cand.new_as_stored().items()}
        return lc.replace(**stored, pos=select.write_slot(lc.pos, target, cand.pos[..., c:]),
                          valid=select.write_slot(lc.valid, target, cand.valid[..., c:]),
                          score=select.write_slot(lc.score, target, score[..., c:]))
