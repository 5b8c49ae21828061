"""`Kivi(policy, "int4" | "int2")`: any policy over KIVI's 4-/2-bit slots (arXiv 2402.02750).

KIVI stores keys per channel and values per token in asymmetric low-bit codes
(`kvjax.quant.GroupedFormat`) and keeps the newest R tokens in full precision,
so what attention reads most is exact (Sec. 3.3, Fig. 2). Here the slots hold
the codes, `LayerCache.groups` their float16 statistics, and a ring of R
entries beside them (this wrapper's state) the newest tokens' slot contents.

Each step runs the wrapped policy on a view of the layer in the model's dtype:
a slot reads its ring entry while its token is among the newest R, its codes
after. The policy scores, evicts and merges on that view, and attention reads
it. The layer is then stored back in codes: a changed slot is quantized when
it is written, and slots left alone keep their codes bit for bit. A key group
keeps its range while newcomers fall inside it; a newcomer outside re-fits the
range to the group's slots and re-codes them once. The newest slots go to the
ring, so a token that leaves it is read from codes quantized from its exact
value, as in KIVI.

Deviations, named: the view is materialised per layer and step (the kernels do
not read 4-/2-bit codes yet, so this costs a pass over the layer); key groups
run over slot order, not arrival order; policy state beside the slots (POD's
distant ring, DMC's accumulators) stays in the model's dtype; every layer's
slots must be a multiple of the group (32), so sliding-window layers are not
supported. The kvpress protocol's `KVCache.with_room` adds whole groups.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from kvjax.cache import EMPTY_POS, GroupStats, LayerCache
from kvjax.policies.quantized import Quantized
from kvjax.quant import GroupedFormat, masked_range


@struct.dataclass
class Residual:
    """The newest tokens' slot contents in full precision: entry `pos % R` holds the slot `slot`
    whose token is at `pos`. `inner` is the wrapped policy's own state."""

    k: Float[Array, "B H R D"]
    v: Float[Array, "B H R D"]
    pos: Int[Array, "B H R"]
    slot: Int[Array, "B H R"]
    inner: object = None

    @property
    def grows(self) -> bool:
        """The ring does not depend on the capacity: `KVCache.with_room` may add slots unless the
        wrapped policy's own state forbids it."""
        return self.inner is None


@dataclasses.dataclass(frozen=True)
class Kivi(Quantized):
    """`inner` with its slots in KIVI's `kv_dtype` ("int4" or "int2") and a full-precision residual."""

    grouped: ClassVar[bool] = True

    def resolve(self, spec) -> tuple["Kivi", ...]:
        fmt = self.kv_format
        fmt.check(spec.head_dim)
        layers = super().resolve(spec)
        odd = sorted({p.slots for p in layers if p.slots % fmt.group})
        if odd:
            raise ValueError(f"{self.name} in {self.kv_dtype}: every layer's slots must be a multiple of the group "
                             f"({fmt.group}), got {odd}; choose a capacity that makes them one (POD: sinks + window; plan_capacity "
                             "rounds its budgets down to whole groups)")
        return layers

    def init_state(self, spec, layer: int, batch: int) -> Residual:
        r = self.kv_format.residual
        lead = (batch, spec.kv_heads, r)
        return Residual(k=jnp.zeros(lead + (spec.head_dim,), spec.dtype), v=jnp.zeros(lead + (spec.head_dim,), spec.dtype),
                        pos=jnp.full(lead, EMPTY_POS, jnp.int32), slot=jnp.full(lead, -1, jnp.int32),
                        inner=self.inner.init_state(spec, layer, batch))

    def update(self, cache, layer, q, k, v, step, attn):
        fmt, stored, ring = self.kv_format, cache.layers[layer], cache.state[layer]
        view = read(fmt, stored, ring, step.seen, k.dtype)
        out, cache = self.inner.update(cache.replace_layer(layer, view).replace_state(layer, ring.inner), layer, q, k, v, step, attn)
        new = cache.layers[layer]
        ring = remember(ring, new, step.seen_after, cache.state[layer])
        return out, cache.replace_layer(layer, write(fmt, new, view, stored)).replace_state(layer, ring)


def _recent(pos: Int[Array, "B H C"], valid: Bool[Array, "B H C"], seen: Int[Array, " B"], r: int) -> Bool[Array, "B H C"]:
    return valid & (pos >= seen[:, None, None] - r)


def read(fmt: GroupedFormat, stored: LayerCache, ring: Residual, seen: Int[Array, " B"], dtype) -> LayerCache:
    """The layer in `dtype`: the newest `residual` tokens from the ring, the others dequantized."""
    b, h, c, d = stored.k.shape
    g, stats = fmt.group, stored.groups
    keys = fmt.dequantize(_by_channel(stored.k, g), stats.k_scale, stats.k_zero, dtype)  # [B H N D G]
    keys = keys.swapaxes(-1, -2).reshape(b, h, c, d)
    values = fmt.dequantize(_by_token(stored.v, fmt), stats.v_scale, stats.v_zero, dtype).reshape(b, h, c, d)
    entry = jnp.where(stored.pos >= 0, stored.pos % fmt.residual, 0)
    hit = (_recent(stored.pos, stored.valid, seen, fmt.residual) & (jnp.take_along_axis(ring.pos, entry, 2) == stored.pos)
           & (jnp.take_along_axis(ring.slot, entry, 2) == jnp.arange(c)))[..., None]
    exact = lambda x: jnp.take_along_axis(x, entry[..., None], 2).astype(dtype)  # noqa: E731
    return stored.replace(k=jnp.where(hit, exact(ring.k), keys), v=jnp.where(hit, exact(ring.v), values), groups=None)


def write(fmt: GroupedFormat, new: LayerCache, view: LayerCache, stored: LayerCache) -> LayerCache:
    """`new` (the policy's output, in the model's dtype) in codes. Changed slots are quantized. A key
    group keeps its stats while its newcomers fall inside its range (they are coded on its grid,
    its other slots keep their codes); a newcomer outside it re-fits the range to the group's
    slots now, and they are coded anew. So a slot is re-rounded only when a newcomer leaves its
    group's grid, not each time a neighbour is evicted (measured on SmolLM2, H2O over int2 at 1/32
    of the bytes: perplexity 324 re-coding on every change, 179 with ranges that only grow, 104
    re-fitting). Value rows are per token: a changed row is coded anew."""
    b, h, c, d = new.k.shape
    g = fmt.group
    changed = (new.k != view.k).any(-1) | (new.v != view.v).any(-1) | (new.pos != view.pos) | (new.valid != view.valid)
    each = lambda mask: _by_channel(jnp.broadcast_to(mask[..., None], new.k.shape), g)  # noqa: E731
    keys, old_codes, valid = _by_channel(new.k, g), _by_channel(stored.k, g), each(new.valid)
    fresh, kept = valid & each(changed), valid & ~each(changed)
    lo, hi = masked_range(keys, fresh)
    old_scale, old_zero = stored.groups.k_scale, stored.groups.k_zero
    old_lo = old_zero.astype(jnp.float32)
    old_hi = old_lo + fmt.levels * old_scale.astype(jnp.float32)
    inside = ~fresh.any(-1) | (kept.any(-1) & (lo >= old_lo) & (hi <= old_hi))
    scale, zero = fmt.grid(*masked_range(keys, valid))
    scale, zero = jnp.where(inside, old_scale, scale), jnp.where(inside, old_zero, zero)
    recode = ~inside[..., None] | each(changed)
    k_codes = jnp.where(recode, fmt.encode(keys, scale, zero), old_codes)
    k_codes = jnp.where(valid, k_codes, 0).astype(fmt.dtype).swapaxes(-1, -2).reshape(b, h, c, d)
    v_codes, v_scale, v_zero = fmt.quantize(_by_token(new.v, fmt))
    row = changed[..., None]
    stats = GroupStats(k_scale=scale, k_zero=zero, v_scale=jnp.where(row, v_scale, stored.groups.v_scale),
                       v_zero=jnp.where(row, v_zero, stored.groups.v_zero))
    v_codes = jnp.where(row, v_codes.reshape(b, h, c, d), stored.v)
    return new.replace(k=k_codes, v=v_codes, groups=stats)


def remember(ring: Residual, new: LayerCache, seen: Int[Array, " B"], inner_state) -> Residual:
    """The ring after a step: entry pos % R takes the slot holding the token at pos, for the newest R
    tokens kept (when two slots claim an entry, the later slot wins; the other is read from codes)."""
    r, c = ring.pos.shape[-1], new.pos.shape[-1]
    claims = _recent(new.pos, new.valid, seen, r)[..., None] & ((new.pos % r)[..., None] == jnp.arange(r))  # [B H C R]
    slot = jnp.argmax(jnp.where(claims, jnp.arange(c)[:, None], -1), axis=2)  # [B H R]
    taken = claims.any(2)
    pick = lambda x, old: jnp.where(taken[..., None], jnp.take_along_axis(x, slot[..., None], 2), old)  # noqa: E731
    return Residual(k=pick(new.k, ring.k), v=pick(new.v, ring.v),
                    pos=jnp.where(taken, jnp.take_along_axis(new.pos, slot, 2), ring.pos),
                    slot=jnp.where(taken, slot, ring.slot), inner=inner_state)


def _by_channel(x: Array, group: int) -> Array:
    """[B H C D] -> [B H C/group D group]: each channel's values over a group of slots."""
    b, h, c, d = x.shape
    return x.reshape(b, h, c // group, group, d).swapaxes(-1, -2)


def _by_token(x: Array, fmt: GroupedFormat) -> Array:
    """[B H C D] -> [B H C D/vg vg]: each slot's channels in groups."""
    b, h, c, d = x.shape
    vg = fmt.value_group(d)
    return x.reshape(b, h, c, d // vg, vg)
