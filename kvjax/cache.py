"""The fixed-capacity KV cache pytree (DESIGN.md, "The cache pytree").

Every array keeps its shape for a whole generation: emptiness, order and
provenance are data (`valid`, `pos`), never shape.

Each layer owns its buffers (a tuple of `LayerCache`, not one array stacked
over layers). Measured on CPU: XLA materialises a layer slice of a stacked
buffer before the attention matmul and copies the whole stack before the
in-place slot write, which made a decode step 2.4x slower; separate buffers
are read in place and written in place. It also lets a policy give every
layer its own capacity (PyramidKV) and really save the memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int, Shaped

from kvjax.quant import GroupedFormat, SlotFormat

EMPTY_POS = -1  # `pos` of a slot that holds nothing


@struct.dataclass
class GroupStats:
    """KIVI's float16 scales and zero points (`kvjax.quant.GroupedFormat`): keys per (group of
    `group` slots, channel), values per (slot, group of channels)."""

    k_scale: Float[Array, "B H N D"]
    k_zero: Float[Array, "B H N D"]
    v_scale: Float[Array, "B H C M"]
    v_zero: Float[Array, "B H C M"]

    @classmethod
    def empty(cls, fmt: GroupedFormat, lead: tuple[int, int, int], head_dim: int) -> "GroupStats":
        b, h, c = lead
        keys, values = (b, h, c // fmt.group, head_dim), (b, h, c, head_dim // fmt.value_group(head_dim))
        zeros = lambda shape: jnp.zeros(shape, jnp.float16)  # noqa: E731
        return cls(k_scale=zeros(keys), k_zero=zeros(keys), v_scale=zeros(values), v_zero=zeros(values))

    def grown(self, extra: int, slots: int) -> "GroupStats":
        """The stats of a layer of `slots` slots grown by `extra` empty ones (whole key groups)."""
        pad = lambda x, by: jnp.pad(x, [(0, 0), (0, 0), (0, by), (0, 0)])  # noqa: E731
        groups = extra * self.k_scale.shape[2] // slots
        return GroupStats(k_scale=pad(self.k_scale, groups), k_zero=pad(self.k_zero, groups),
                          v_scale=pad(self.v_scale, extra), v_zero=pad(self.v_zero, extra))


@struct.dataclass
class LayerCache:
    """One layer's slots.

    k, v:   [batch, kv_heads, slots, head_dim] slot contents (keys after RoPE at
            their original position, unless the policy rotates at cache
            positions, then before RoPE).
    pos:    [batch, kv_heads, slots] original token position a slot stands for.
    valid:  [batch, kv_heads, slots] slot in use.
    score:  [batch, kv_heads, slots] the policy's statistic (f32).
    k_scale, v_scale: [batch, kv_heads, slots] f32 scales when k and v are stored
            quantized (`kvjax.quant`, under `kvjax.policies.Quantized`), else None.
    groups: KIVI's group statistics when k and v hold its 4-/2-bit codes (`kvjax.policies.Kivi`).
    """

    k: Shaped[Array, "B H C D"]
    v: Shaped[Array, "B H C D"]
    pos: Int[Array, "B H C"]
    valid: Bool[Array, "B H C"]
    score: Float[Array, "B H C"]
    k_scale: Float[Array, "B H C"] | None = None
    v_scale: Float[Array, "B H C"] | None = None
    groups: GroupStats | None = None

    @property
    def slots(self) -> int:
        return self.k.shape[2]


@struct.dataclass
class KVCache:
    """The caches of all layers plus `seen` [batch]: tokens consumed so far.

    `state` is policy state beside the slots, one entry per layer (None where
    a layer keeps none): POD's distant ring, DMC's open-slot accumulators.
    `policies` (static) is the policy of each layer, resolved against the model
    once (`CacheSpec.init`), so a model's layers never see the policy machinery.
    """

    layers: tuple[LayerCache, ...]
    seen: Int[Array, " B"]
    state: tuple = ()
    policies: tuple = struct.field(pytree_node=False, default=())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch(self) -> int:
        return self.seen.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.layers[0].k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.layers[0].k.shape[3]

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(layer.slots for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache buffers (what a benchmark reports; 4-/2-bit codes packed, as XLA
        allocates them)."""
        return sum(int(x.size) * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(self))

    def lengths(self) -> Int[Array, "L B H"]:
        """Valid slots per (layer, batch row, KV head)."""
        return jnp.stack([layer.valid.sum(-1) for layer in self.layers])

    def compression_ratio(self) -> Float[Array, "L B H"]:
        """Tokens seen per slot in use, per (layer, batch row, KV head): DMC's achieved CR."""
        return self.seen[None, :, None] / jnp.maximum(self.lengths(), 1)

    def replace_layer(self, index: int, layer: LayerCache) -> "KVCache":
        return self.replace(layers=self.layers[:index] + (layer,) + self.layers[index + 1 :])

    def replace_state(self, index: int, state) -> "KVCache":
        return self.replace(state=self.state[:index] + (state,) + self.state[index + 1 :])

    def with_room(self, extra: int) -> "KVCache":
        """This cache with `extra` empty slots more in every layer and its policies' capacities raised
        to match, so the next `extra` tokens are appended without evicting anything.

        kvpress's protocol (compress a context once, then append the question and the answer
        uncompressed) is a prefill, then `with_room(question + answer)`. Slots stored in KIVI's
        formats come in groups, so their room is rounded up to whole groups. A policy that keeps
        state sized by its capacity (POD's distant ring, DMC's accumulators) cannot grow: the
        error says so. The new arrays are a copy (the cache changes shape), made once per call.
        """
        if not isinstance(extra, int) or extra < 0:
            raise ValueError(f"with_room: extra must be an int >= 0, got {extra!r}")
        fixed = sorted({p.name for p, st in zip(self.policies, self.state) if st is not None and not getattr(st, "grows", False)})
        if fixed:
            raise ValueError(f"with_room: {', '.join(fixed)} keeps state sized by its capacity (POD's distant ring, "
                             "DMC's accumulators) and cannot grow; "
                             "run it under the streaming protocol (the whole prompt through the fixed-capacity cache)")
        multiple = max((p.kv_format.slot_multiple for p in self.policies if p.kv_format is not None), default=1)
        extra = -(-extra // multiple) * multiple

        def pad(x, fill):
            return jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)

        def grown(lc: LayerCache) -> LayerCache:
            fills = dict(k=0, v=0, pos=EMPTY_POS, valid=False, score=0, k_scale=1, v_scale=1)
            out = lc.replace(**{name: pad(getattr(lc, name), fill) for name, fill in fills.items() if getattr(lc, name) is not None})
            return out if lc.groups is None else out.replace(groups=lc.groups.grown(extra, lc.slots))

        return self.replace(layers=tuple(map(grown, self.layers)),
                            policies=tuple(_with_capacity(p, p.capacity + extra) for p in self.policies))


def _with_capacity(policy, capacity: int):
    """The policy with another capacity (a wrapper such as `KeyRerotation` passes it to what it wraps)."""
    if hasattr(policy, "inner"):
        return dataclasses.replace(policy, inner=_with_capacity(policy.inner, capacity))
    return dataclasses.replace(policy, capacity=capacity)


def init_cache(
    *,
    slots: int | Sequence[int],
    num_layers: int,
    batch: int,
    kv_heads: int,
    head_dim: int,
    dtype=jnp.float32,
    formats: Sequence[SlotFormat | GroupedFormat | None] | None = None,
) -> KVCache:
    """An empty cache with no policy; `slots` is one static size for every layer or one per
    layer; `formats` the slot storage of each layer (None: `dtype`, unscaled).
    `CacheSpec.init(policy, batch)` builds the cache a policy runs on."""
    for name, value in dict(num_layers=num_layers, batch=batch, kv_heads=kv_heads, head_dim=head_dim).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}")
    per_layer = (slots,) * num_layers if isinstance(slots, int) else tuple(slots)
    if len(per_layer) != num_layers or not all(isinstance(s, int) and s >= 1 for s in per_layer):
        raise ValueError(f"init_cache: slots must be a positive int or {num_layers} of them, got {slots!r}")

    formats = (None,) * num_layers if formats is None else tuple(formats)
    if len(formats) != num_layers:
        raise ValueError(f"init_cache: formats must give one slot format per layer ({num_layers}), got {len(formats)}")

    def layer(c: int, fmt: SlotFormat | GroupedFormat | None) -> LayerCache:
        lead = (batch, kv_heads, c)
        scale = lambda: jnp.ones(lead, jnp.float32) if fmt is not None and fmt.scaled else None  # noqa: E731
        store = dtype if fmt is None else fmt.dtype
        return LayerCache(
            k=jnp.zeros(lead + (head_dim,), store),
            v=jnp.zeros(lead + (head_dim,), store),
            pos=jnp.full(lead, EMPTY_POS, jnp.int32),
            valid=jnp.zeros(lead, bool),
            score=jnp.zeros(lead, jnp.float32),
            k_scale=scale(),
            v_scale=scale(),
            groups=GroupStats.empty(fmt, lead, head_dim) if fmt is not None and fmt.grouped else None,
        )

    layers = tuple(layer(c, fmt) for c, fmt in zip(per_layer, formats))
    return KVCache(layers=layers, seen=jnp.zeros((batch,), jnp.int32))
