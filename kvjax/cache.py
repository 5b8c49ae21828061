"""The fixed-capacity KV cache pytree (DESIGN.md, "The cache pytree").

Every array keeps its shape for a whole generation: emptiness, order and
provenance are data (`valid`, `pos`), never shape. Layers are stacked on the
leading axis so a model can index one layer or scan over all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

EMPTY_POS = -1  # `pos` of a slot that holds nothing


@struct.dataclass
class KVCache:
    """Per-layer slots of keys and values, stacked over layers.

    k, v:   [layers, batch, kv_heads, slots, head_dim] slot contents (keys after
            RoPE at their original position, unless the policy rotates at
            cache positions, then before RoPE).
    pos:    [layers, batch, kv_heads, slots] original token position of a slot.
    valid:  [layers, batch, kv_heads, slots] slot in use.
    score:  [layers, batch, kv_heads, slots] the policy's statistic (f32).
    seen:   [batch] tokens consumed so far, i.e. the next position.
    """

    k: Float[Array, "L B H C D"]
    v: Float[Array, "L B H C D"]
    pos: Int[Array, "L B H C"]
    valid: Bool[Array, "L B H C"]
    score: Float[Array, "L B H C"]
    seen: Int[Array, " B"]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache buffers (what a benchmark reports)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def lengths(self) -> Int[Array, "L B H"]:
        """Valid slots per (layer, batch row, KV head)."""
        return self.valid.sum(-1)


def init_cache(
    *,
    slots: int,
    num_layers: int,
    batch: int,
    kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
) -> KVCache:
    """An empty cache; `slots` is the policy's static buffer size (`policy.slots`)."""
    for name, value in dict(
        slots=slots, num_layers=num_layers, batch=batch, kv_heads=kv_heads, head_dim=head_dim
    ).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}")
    lead = (num_layers, batch, kv_heads, slots)
    return KVCache(
        k=jnp.zeros(lead + (head_dim,), dtype),
        v=jnp.zeros(lead + (head_dim,), dtype),
        pos=jnp.full(lead, EMPTY_POS, jnp.int32),
        valid=jnp.zeros(lead, bool),
        score=jnp.zeros(lead, jnp.float32),
        seen=jnp.zeros((batch,), jnp.int32),
    )
