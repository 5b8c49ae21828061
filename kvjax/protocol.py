"""What kvjax needs from a model (kvjax never imports `models/`)."""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from kvjax.cache import KVCache, init_cache
from kvjax.policies import resolve
from kvjax.policies.base import Policy, Step


@struct.dataclass(frozen=True)
class CacheSpec:
    """Cache dimensions a model asks for."""

    num_layers: int = struct.field(pytree_node=False)
    kv_heads: int = struct.field(pytree_node=False)
    head_dim: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")
    sliding_windows: tuple[int | None, ...] | None = struct.field(pytree_node=False, default=None)
    dmc_decisions: bool = struct.field(pytree_node=False, default=False)  # q/k dimension d-1 retrofitted for DMC

    def init(self, policy: Policy, batch: int) -> KVCache:
        """An empty cache for `policy`, resolved against this spec once (`kvjax.policies.resolve`):
        each layer's slots and state as its policy says, and the per-layer policies it carries."""
        layers = resolve(policy, self)
        policy.check_batch(batch)
        return _empty_cache(self, layers, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _empty_cache(spec: CacheSpec, layers: tuple[Policy, ...], batch: int) -> KVCache:
    """`CacheSpec.init` after its checks, as one compiled program: made one by one, SmolLM2's
    30 layers of buffers were 300 dispatches, about 25 ms of every `generate` call."""
    cache = init_cache(
        slots=tuple(p.slots for p in layers), num_layers=spec.num_layers, batch=batch,
        kv_heads=spec.kv_heads, head_dim=spec.head_dim, dtype=jnp.dtype(spec.dtype),
        formats=tuple(p.kv_format for p in layers),
    )
    state = tuple(p.init_state(spec, layer, batch) for layer, p in enumerate(layers))
    return cache.replace(state=state, policies=layers)


class CachedDecoder(Protocol):
    """A decoder whose attention layers call `kvjax.attend` on their cache layer
    (the cache carries each layer's policy)."""

    vocab_size: int
    hidden_size: int

    def cache_spec(self) -> CacheSpec: ...

    def __call__(self, tokens: Int[Array, "B S"], cache: KVCache, step: Step) -> tuple[Float[Array, "B S d"], KVCache]:
        """Hidden states of a chunk; `step.positions` gives each token's position."""
        ...

    def logits(self, hidden: Float[Array, "*B d"]) -> Float[Array, "*B V"]: ...
