"""`Quantized(policy, kv_dtype)`: any policy over slots stored in a narrow format (`kvjax.quant`).

A cross-cutting wrapper, like `KeyRerotation`: the cache allocates each layer's
k and v in the format (int8 or fp8 with a per-(slot, KV head) scale, or
bfloat16), and tokens are quantized when they are written to a slot (KIVI,
arXiv 2402.02750, quantizes at the same point). Two paths, one result:

- Policies that run the scorer tier as it is (full, window, StreamingLLM, H2O,
  TOVA, SnapKV, PyramidKV, KNorm, random; `keeps_slots_as_stored`): the slots
  stay narrow through the step. Attention reads them as stored, the kernels
  and the XLA path apply the scales inside, and a decode step quantizes and
  writes only the new token.
- Every other policy (merging, POD, DMC, re-rotated keys) runs on a view of
  the layer dequantized to the model's dtype, and the layer is quantized back
  afterwards: its scores see the dequantized keys, merged slots are quantized
  again, and slots the update left unchanged keep their stored data and scale
  bit for bit. That path costs a full pass over the layer each step.

Deviation, named: policy state beside the slots (POD's distant ring, DMC's
accumulators) stays in the model's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.policies.base import Policy
from kvjax.policies.scorer import keeps_slots_as_stored
from kvjax.quant import SlotFormat, slot_format


@dataclasses.dataclass(frozen=True)
class Quantized(Policy):
    """`inner` with its slots stored as `kv_dtype` ("int8", "fp8", "bfloat16", "float32")."""

    inner: Policy
    kv_dtype: str
    grouped: ClassVar[bool] = False  # stores KIVI's grouped formats (the `Kivi` subclass)

    def __post_init__(self):
        if not isinstance(self.inner, Policy):
            raise TypeError(f"Quantized wraps a kvjax Policy, got {type(self.inner).__name__}")
        if isinstance(self.inner, Quantized):
            raise TypeError(f"{self.inner.name} is already stored as {self.inner.kv_dtype}; wrap the policy once")
        if slot_format(self.kv_dtype).grouped != self.grouped:  # an unknown format fails here, listing the known ones
            raise ValueError(f"{type(self).__name__} does not store {self.kv_dtype!r}: int4 and int2 are KIVI's formats "
                             "(Kivi), the others Quantized's; kvjax.policies.stored_as(policy, kv_dtype) picks the wrapper")

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def kv_format(self) -> SlotFormat:
        return slot_format(self.kv_dtype)

    def __getattr__(self, attr: str):
        """Everything else (capacity, sinks, window, slots, ...) is the wrapped policy's."""
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    @property
    def slots(self) -> int:
        return self.inner.slots

    def resolve(self, spec) -> tuple[Policy, ...]:
        return tuple(type(self)(p, self.kv_dtype) for p in self.inner.resolve(spec))

    def init_state(self, spec, layer: int, batch: int):
        return self.inner.init_state(spec, layer, batch)

    def check_batch(self, batch: int) -> None:
        self.inner.check_batch(batch)

    def check_length(self, tokens: int, what: str = "prompt + max_new_tokens") -> None:
        self.inner.check_length(tokens, what)

    def update(self, cache, layer, q, k, v, step, attn):
        if keeps_slots_as_stored(self.inner):
            return self.inner.update(cache, layer, q, k, v, step, attn, fmt=self.kv_format)
        return self.update_on_view(cache, layer, q, k, v, step, attn)

    def update_on_view(self, cache, layer, q, k, v, step, attn):
        """The wrapped update on the layer dequantized to the model's dtype, then quantized back."""
        fmt = self.kv_format
        stored = cache.layers[layer]
        view = stored.replace(k=fmt.dequantize(stored.k, stored.k_scale, k.dtype),
                              v=fmt.dequantize(stored.v, stored.v_scale, v.dtype), k_scale=None, v_scale=None)
        out, cache = self.inner.update(cache.replace_layer(layer, view), layer, q, k, v, step, attn)
        new = cache.layers[layer]
        k_data, k_scale = _store(fmt, new.k, view.k, stored.k, stored.k_scale)
        v_data, v_scale = _store(fmt, new.v, view.v, stored.v, stored.v_scale)
        return out, cache.replace_layer(layer, new.replace(k=k_data, v=v_data, k_scale=k_scale, v_scale=v_scale))


def _store(fmt: SlotFormat, new, view, data, scale):
    """`new` slots in the format; a slot equal to its dequantized `view` keeps its stored (data, scale)."""
    new_data, new_scale = fmt.quantize(new)
    if not fmt.scaled:
        return new_data, None
    same = (new == view).all(-1)
    return jnp.where(same[..., None], data, new_data), jnp.where(same, scale, new_scale)
