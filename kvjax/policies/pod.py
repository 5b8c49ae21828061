"""POD, proximal over distant tokens (Ma et al., arXiv 2412.02252): distant keys shared across layers.

Proximal tokens (the first `sinks` and the last `window`) keep their own keys
and values in every layer, in the layer's ordinary slots. Distant tokens (those
that left the window) go to a ring of `capacity - sinks - window` slots per
layer, indexed by position, so every layer holds the same distant tokens in the
same slots (oldest overwritten first). For distant tokens only the lowest layer
of each block, per KV head, stores keys (`owners[l][h]` is the layer whose
distant keys layer l, head h reads; `owners[l][h] == l` means l stores them);
every layer stores its own values. Layer l attends with its own queries over
its proximal keys and the owner's distant keys in one masked softmax, which
equals the paper's gate g·o_P + (1-g)·o_D (spec §4, Eq. 3).

So non-owner layers hold no distant keys: `KVCache.distant[l].k` has one row
per head that layer l owns, and the cache bytes show the saving. Blocks come
from `kvjax.calibrate.pod_blocks` (Jensen-Shannon similarity, greedy
consecutive grouping); `owners=None` gives blocks of size one (no sharing).

Deviations, named: the paper keeps every distant token; with a predefined
capacity the distant ring drops the oldest. In the step a distant slot is
overwritten, non-owner layers (which run after their owner) no longer see the
token it held, one step before they would lose it anyway. Token selection on
top of POD (POD + SnapKV) is not implemented.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from kvjax.policies.base import Policy


@struct.dataclass
class DistantCache:
    """One layer's distant ring: k [B, owned heads, R, D], v [B, H, R, D], pos and valid [B, H, R]."""

    k: Float[Array, "B O R D"]
    v: Float[Array, "B H R D"]
    pos: Int[Array, "B H R"]
    valid: Bool[Array, "B H R"]


@dataclasses.dataclass(frozen=True)
class POD(Policy):
    """Keeps: sinks + window with own keys; a distant ring whose keys are shared within layer blocks."""

    sinks: int = 16  # n_s of the paper
    window: int | None = None  # default capacity // 4
    owners: tuple[tuple[int, ...], ...] | None = None  # owners[l][h], or owners[l] = (o,) for all heads

    name = "pod"
    shares_keys = True

    def __post_init__(self):
        if self.window is None:
            object.__setattr__(self, "window", self.capacity // 4 if isinstance(self.capacity, int) else 0)
        if self.owners is not None:
            object.__setattr__(self, "owners", tuple(tuple(int(o) for o in row) for row in self.owners))
            for layer, row in enumerate(self.owners):
                if any(not 0 <= o <= layer for o in row):
                    raise ValueError(f"pod: owners[{layer}]={row} must name layers 0..{layer} (a block's lowest layer)")
                heads = max(len(row), *(len(self.owners[o]) for o in row))
                if any(self.owner(o, heads)[h] != o for h, o in enumerate(self.owner(layer, heads))):
                    raise ValueError(f"pod: owners[{layer}]={row} names a layer that does not store its own keys")
        super().__post_init__()

    @property
    def min_capacity(self) -> int:
        return self.sinks + self.window + 1

    @property
    def protected_description(self) -> str:
        return f"sinks={self.sinks} + window={self.window} + 1 distant slot"

    @property
    def ring(self) -> int:
        return self.capacity - self.sinks - self.window

    def layer_slots(self, num_layers: int) -> tuple[int, ...]:
        if self.owners is not None and len(self.owners) != num_layers:
            raise ValueError(f"pod: owners has {len(self.owners)} layers, the model has {num_layers}")
        return (self.sinks + self.window,) * num_layers

    def owner(self, layer: int, kv_heads: int) -> tuple[int, ...]:
        """Per KV head, the layer whose distant keys `layer` reads (a one-entry row covers every head)."""
        row = (layer,) if self.owners is None else self.owners[layer]
        if len(row) not in (1, kv_heads):
            raise ValueError(f"pod: owners[{layer}] has {len(row)} entries; give one per KV head ({kv_heads}) or one for all")
        return row * kv_heads if len(row) == 1 else row

    def owned(self, layer: int, kv_heads: int) -> tuple[int, ...]:
        """Heads whose distant keys `layer` stores."""
        return tuple(h for h, o in enumerate(self.owner(layer, kv_heads)) if o == layer)

    def init_distant(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype) -> tuple[DistantCache, ...]:
        lead = (batch, kv_heads, self.ring)
        return tuple(
            DistantCache(
                k=jnp.zeros((batch, len(self.owned(layer, kv_heads)), self.ring, head_dim), dtype),
                v=jnp.zeros(lead + (head_dim,), dtype),
                pos=jnp.full(lead, -1, jnp.int32),
                valid=jnp.zeros(lead, bool),
            )
            for layer in range(num_layers)
        )

    def distant_view(self, distant: tuple[DistantCache, ...], layer: int):
        """Keys (from each head's owner), own values and the mask layer `layer` attends over."""
        mine = distant[layer]
        heads = mine.v.shape[1]
        keys, fresh = [], []
        for h, o in enumerate(self.owner(layer, heads)):
            row = self.owned(o, heads).index(h)
            keys.append(distant[o].k[:, row])
            fresh.append(distant[o].pos[:, h] == mine.pos[:, h])  # a slot its owner overwrote this step is stale here
        return jnp.stack(keys, 1), mine.v, mine.valid & jnp.stack(fresh, 1), mine.pos

    def push(self, d: DistantCache, layer: int, k, v, pos, leaving) -> DistantCache:
        """Write the tokens leaving the window ([B, H, N] candidates) into the ring at pos mod R."""
        ring = self.ring
        newest = jnp.where(leaving, pos, -1).max(-1, keepdims=True)
        write = leaving & (pos > newest - ring)  # if more than R leave at once, the newest R
        slot = jnp.where(write, pos % ring, ring)  # ring = out of range: no write
        b, h, _ = pos.shape
        bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
        owned = jnp.asarray(self.owned(layer, h), jnp.int32)
        return DistantCache(
            k=d.k.at[bi, jnp.arange(len(owned))[None, :, None], slot[:, owned]].set(k[:, owned], mode="drop"),
            v=d.v.at[bi, hi, slot].set(v, mode="drop"),
            pos=d.pos.at[bi, hi, slot].set(pos, mode="drop"),
            valid=d.valid.at[bi, hi, slot].set(True, mode="drop"),
        )
