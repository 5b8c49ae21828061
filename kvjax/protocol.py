"""What kvjax needs from a model (kvjax never imports `models/`)."""

from __future__ import annotations

from typing import Protocol

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from kvjax.cache import KVCache, init_cache
from kvjax.policies.base import Policy, Step
from kvjax.policies.per_layer import PerLayer
from kvjax.policies.window import Window


@struct.dataclass(frozen=True)
class CacheSpec:
    """Cache dimensions a model asks for."""

    num_layers: int = struct.field(pytree_node=False)
    kv_heads: int = struct.field(pytree_node=False)
    head_dim: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")
    sliding_windows: tuple[int | None, ...] | None = struct.field(pytree_node=False, default=None)

    def resolve(self, policy: Policy) -> Policy:
        """The policy of every layer: sliding-window layers (a window of w tokens,
        the current one included) are the `window` policy with capacity w - 1;
        the given policy runs the global layers."""
        if not self.sliding_windows or not any(self.sliding_windows):
            return policy
        return PerLayer.of(
            policy if w is None else Window(capacity=w - 1, max_distance=w - 1) for w in self.sliding_windows
        )

    def init(self, policy: Policy, batch: int) -> KVCache:
        """An empty cache sized by the (resolved) policy's static slot counts."""
        resolved = self.resolve(policy)
        cache = init_cache(
            slots=resolved.layer_slots(self.num_layers), num_layers=self.num_layers, batch=batch,
            kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=jnp.dtype(self.dtype),
        )
        state = policy.init_state(self.num_layers, batch, self.kv_heads, self.head_dim, jnp.dtype(self.dtype))
        if state and resolved is not policy:
            raise ValueError(f"{policy.name}: models with sliding-window layers are not supported")
        return cache.replace(state=state)


class CachedDecoder(Protocol):
    """A decoder whose attention layers call `kvjax.attend` on their cache layer."""

    vocab_size: int
    hidden_size: int

    def cache_spec(self) -> CacheSpec: ...

    def __call__(
        self, tokens: Int[Array, "B S"], cache: KVCache, policy: Policy, step: Step
    ) -> tuple[Float[Array, "B S d"], KVCache]:
        """Hidden states of a chunk; `step.positions` gives each token's position."""
        ...

    def logits(self, hidden: Float[Array, "*B d"]) -> Float[Array, "*B V"]: ...
