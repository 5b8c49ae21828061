"""Slot storage formats: how many bits a cached key or value costs.

A predefined capacity is a byte budget, and it buys tokens two ways: fewer
slots (a policy) or fewer bits per slot (a format). A format stores each slot's
head vector [D] as `data` in a narrow type with one f32 `scale` per (slot, KV
head), the absolute maximum of the vector over the type's largest value, so
`x ~= data * scale`:

- "float32", "bfloat16": the values themselves (no scale);
- "int8": round(x / scale) in [-127, 127] (symmetric absmax, as KIVI's and
  KVQuant's baselines; arXiv 2402.02750, Sec. 2);
- "fp8": x / scale cast to float8 e4m3 (max 448), where the backend has it.

Quantizing what was just dequantized gives the same data back (the largest
element maps to the type's maximum again), so a slot that a policy leaves
alone is not degraded by later steps.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float


@dataclasses.dataclass(frozen=True)
class SlotFormat:
    """One storage format: `dtype` holds the data; `top` is its largest magnitude (None: stored as is)."""

    name: str
    dtype: jnp.dtype
    top: float | None = None

    @property
    def scaled(self) -> bool:
        return self.top is not None

    def bytes_per_slot(self, head_dim: int) -> int:
        """Bytes of one (slot, KV head) for k and v together, scales included."""
        return 2 * (head_dim * self.dtype.itemsize + (4 if self.scaled else 0))

    def quantize(self, x: Float[Array, "*S D"]) -> tuple[Array, Float[Array, " *S"] | None]:
        """(data, scale) of `x`, one scale per vector along the last axis."""
        if not self.scaled:
            return x.astype(self.dtype), None
        x32 = x.astype(jnp.float32)
        absmax = jnp.abs(x32).max(-1)
        scale = jnp.where(absmax > 0, absmax / self.top, 1.0)
        y = x32 / scale[..., None]
        if jnp.issubdtype(self.dtype, jnp.integer):
            y = jnp.round(y)
        return jnp.clip(y, -self.top, self.top).astype(self.dtype), scale

    def dequantize(self, data: Array, scale: Float[Array, " *S"] | None, dtype) -> Float[Array, "*S D"]:
        """The values `data` stands for, in `dtype`."""
        if scale is None:
            return data.astype(dtype)
        return (data.astype(jnp.float32) * scale[..., None]).astype(dtype)


FORMATS: dict[str, SlotFormat] = {
    f.name: f
    for f in (
        SlotFormat("float32", jnp.dtype(jnp.float32)),
        SlotFormat("bfloat16", jnp.dtype(jnp.bfloat16)),
        SlotFormat("int8", jnp.dtype(jnp.int8), 127.0),
        SlotFormat("fp8", jnp.dtype(jnp.float8_e4m3fn), 448.0),
    )
}


def slot_format(name: str) -> SlotFormat:
    """The format called `name` (one of `FORMATS`)."""
    if name not in FORMATS:
        raise ValueError(f"unknown kv_dtype {name!r}; the slot formats are {', '.join(FORMATS)}")
    return FORMATS[name]
