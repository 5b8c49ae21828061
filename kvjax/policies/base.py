"""The contract every compression policy follows.

A policy is a frozen dataclass of static settings. Once a chunk of tokens has
been attended to, the cache slots and the chunk's tokens are the *candidates*
for the layer's slots; the policy gives each candidate a score (what it keeps
in `KVCache.score`) and the shared machinery in `kvjax.select` keeps the best
of them in the layer's slots, with the protected tokens (the first `sinks` and the last
`window` tokens seen) always kept. So a method is its scoring and little else.

Ties are broken towards evicting the older token, identically for a chunk and
for a single decode step.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

Stats = Literal["all", "last", "window"] | None


@struct.dataclass
class Step:
    """What a layer needs to know about the chunk being consumed.

    seen:      [B] tokens consumed before the chunk.
    positions: [B, S] original position of each chunk token.
    new_valid: [B, S] chunk token is real (not padding).
    key:       PRNG key of this chunk (policies fold in the layer).
    prefill:   static; the chunk belongs to the prompt.
    impl:      static; attention backend ("xla", "pallas" or "auto").
    """

    seen: Int[Array, " B"]
    positions: Int[Array, "B S"]
    new_valid: Bool[Array, "B S"]
    key: jax.Array
    prefill: bool = struct.field(pytree_node=False, default=True)
    impl: str = struct.field(pytree_node=False, default="xla")

    @property
    def seen_after(self) -> Int[Array, " B"]:
        return self.seen + self.new_valid.sum(-1).astype(jnp.int32)


class Candidates(NamedTuple):
    """Cache slots (first `num_cache`) followed by the chunk's tokens, per KV head.

    score: [B, H, N] stored score (0 for chunk tokens).
    mass:  [B, H, N] attention mass received in this chunk, if the policy asked.
    pos, valid: [B, H, N].
    k_new: [B, H, S, D] the chunk's keys as they will be stored.
    num_cache: C, the number of cache slots leading the candidates.
    group: query heads per KV head.
    """

    score: Float[Array, "B H N"]
    mass: Float[Array, "B H N"] | None
    pos: Int[Array, "B H N"]
    valid: Bool[Array, "B H N"]
    k_new: Float[Array, "B H S D"]
    num_cache: int
    group: int

    @property
    def is_new(self) -> Bool[Array, " N"]:
        return jnp.arange(self.pos.shape[-1]) >= self.num_cache


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base: static capacity, protected sinks and recent window, a score.

    capacity: slots per (layer, batch row, KV head).
    sinks: the first `sinks` tokens are never evicted.
    window: the most recent `window` tokens are never evicted.
    """

    capacity: int
    sinks: int = 0
    window: int = 0

    name: ClassVar[str] = ""
    stats: ClassVar[Stats] = None  # which attention statistic `score` consumes
    pure_eviction: ClassVar[bool] = True  # kept slots are the original (k, v)
    evicts: ClassVar[bool] = True  # False: overflowing the capacity is an error
    rotate_at_cache_position: ClassVar[bool] = False  # keys stored before RoPE
    max_distance: ClassVar[int | None] = None  # attention masks keys further back (sliding window)
    merges: ClassVar[bool] = False  # slots are rewritten by `merge`, not kept by rank
    shares_keys: ClassVar[bool] = False  # attends over other layers' state in `KVCache.state` (POD)
    owns_update: ClassVar[bool] = False  # attends and updates its layer itself in `attend_layer` (DMC)

    def __post_init__(self):
        for field, lowest in (("capacity", 1), ("sinks", 0), ("window", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ValueError(f"{self.name}: {field} must be an int >= {lowest}, got {value!r}")
        if self.capacity < self.min_capacity:
            raise ValueError(
                f"{self.name}: capacity={self.capacity} cannot hold the protected tokens "
                f"({self.protected_description}); use capacity >= {self.min_capacity}"
            )

    @property
    def min_capacity(self) -> int:
        return self.sinks + self.window

    @property
    def protected_description(self) -> str:
        return f"sinks={self.sinks} + window={self.window}"

    def for_layer(self, layer: int) -> "Policy":
        """The policy that runs `layer` (itself, unless policies differ per layer)."""
        return self

    def layer_slots(self, num_layers: int) -> tuple[int, ...]:
        """Static slot count of each layer's cache (uniform unless a policy says otherwise)."""
        return (self.capacity,) * num_layers

    def stat_weights(self, step: Step) -> Float[Array, "B S"] | None:
        """Per-query weights of the attention mass the policy consumes, or None."""
        valid = step.new_valid.astype(jnp.float32)
        if self.stats is None:
            return None
        if self.stats == "all":
            return valid
        if self.stats == "last":
            last = jnp.cumsum(step.new_valid[:, ::-1], axis=-1)[:, ::-1] == 1
            return (last & step.new_valid).astype(jnp.float32)
        raise NotImplementedError(f"{self.name}: stats={self.stats!r} needs its own stat_weights")

    def init_state(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype) -> tuple:
        """Per-layer state kept beside the slots in `KVCache.state` (none by default)."""
        return ()

    def score(self, cand: Candidates, step: Step, layer: int) -> Float[Array, "B H N"]:
        """Score of every candidate; higher is kept. Default: keep the newest."""
        return jnp.zeros_like(cand.score)

    def merge(self, fields: dict[str, Array], cand: Candidates, step: Step, layer: int, slots: int) -> dict[str, Array]:
        """Merging policies: the layer's new slots from all candidates.

        `fields` holds k, v [B, H, N, D] and pos, valid, score [B, H, N] of the
        candidates (score as returned by `score`); returns the same names with
        N replaced by `slots`.
        """
        raise NotImplementedError(f"{self.name} sets merges=True but has no merge()")

    def key_positions(self, pos, valid, step: Step):
        """Positions the cached keys and the chunk are rotated at for attention.

        Returns (cache key positions [B, H, C] or None when the cached keys are
        already rotated, chunk positions [B, S]).
        """
        return None, step.positions

    def protected(self, pos: Int[Array, "B H N"], valid: Bool[Array, "B H N"], step: Step) -> Bool[Array, "B H N"]:
        recent = pos >= (step.seen_after - self.window)[:, None, None]
        return valid & ((pos < self.sinks) | recent)
