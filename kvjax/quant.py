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

"int4" and "int2" are KIVI's formats (`GroupedFormat`; arXiv 2402.02750): codes
with a scale and a zero point per group, keys grouped per channel across slots
and values per token, under the `Kivi` policy wrapper.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Shaped


@dataclasses.dataclass(frozen=True)
class SlotFormat:
    """One storage format: `dtype` holds the data; `top` is its largest magnitude (None: stored as is)."""

    name: str
    dtype: jnp.dtype
    top: float | None = None
    grouped: ClassVar[bool] = False  # KIVI's GroupedFormat: stats per group of slots or channels
    slot_multiple: ClassVar[int] = 1  # every layer's slots are a multiple of this

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


@dataclasses.dataclass(frozen=True)
class GroupedFormat:
    """KIVI's asymmetric `bits`-bit codes (arXiv 2402.02750, Sec. 3): x ~= code * scale + zero, with
    zero the group's minimum and scale its range over 2**bits - 1 (Eq. 1).

    Keys are grouped per channel across `group` consecutive slots (KIVI's per-channel key
    quantization: outlier channels keep their own range); values per token, in groups of
    `group` channels. Scales and zero points are float16, as the paper's. The newest
    `residual` tokens are read in full precision from a ring beside the slots (`Kivi`).
    Deviations, named: groups run over slot order, not arrival order (a policy may put any token
    in any slot), and the residual is 32 tokens by default (the paper uses 32 to 128).
    The codes are uint4 / uint2; XLA packs them (two / four per byte in the allocation).
    """

    name: str
    bits: int
    group: int = 32
    residual: int = 32
    scaled: ClassVar[bool] = False  # no per-slot scale beside the codes
    grouped: ClassVar[bool] = True

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype({4: jnp.uint4, 2: jnp.uint2}[self.bits])

    @property
    def slot_multiple(self) -> int:
        return self.group

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def value_group(self, head_dim: int) -> int:
        return min(self.group, head_dim)

    def check(self, head_dim: int) -> None:
        """Raise unless `head_dim` splits into value groups and whole bytes of codes and stats."""
        vg = self.value_group(head_dim)
        if head_dim % vg or (head_dim * self.bits) % 8 or (4 * head_dim) % self.group:
            raise ValueError(f"kv_dtype {self.name!r} (group {self.group}) needs head_dim a multiple of {max(vg, 8)}, got {head_dim}")

    def bytes_per_slot(self, head_dim: int) -> int:
        """Bytes of one (slot, KV head), k and v: the codes, the keys' per-channel stats shared by
        `group` slots, the values' per-token stats (scale and zero point, float16 each)."""
        self.check(head_dim)
        return 2 * head_dim * self.bits // 8 + 4 * head_dim // self.group + 4 * (head_dim // self.value_group(head_dim))

    def quantize(self, x: Float[Array, "*S N G"], valid: Bool[Array, "*S N G"] | None = None):
        """(codes, scale, zero) of `x` grouped along its last axis; entries not `valid` are left out of
        the range (their codes are 0)."""
        keep = jnp.ones(x.shape, bool) if valid is None else valid
        scale, zero = self.grid(*masked_range(x, keep))
        return jnp.where(keep, self.encode(x, scale, zero), 0).astype(self.dtype), scale, zero

    def grid(self, lo: Float[Array, "*S N"], hi: Float[Array, "*S N"]) -> tuple[Array, Array]:
        """(scale, zero) in float16 for groups spanning [lo, hi]."""
        return ((hi - lo) / self.levels).astype(jnp.float16), lo.astype(jnp.float16)

    def encode(self, x: Float[Array, "*S N G"], scale: Float[Array, "*S N"], zero: Float[Array, "*S N"]) -> Array:
        """The codes of `x` on the grid of the stored (float16) stats, so quantizing what was
        dequantized gives the same codes back."""
        s, z = scale.astype(jnp.float32)[..., None], zero.astype(jnp.float32)[..., None]
        return jnp.clip(jnp.round((x.astype(jnp.float32) - z) / jnp.where(s > 0, s, 1.0)), 0, self.levels).astype(self.dtype)

    def dequantize(self, codes: Shaped[Array, "*S N G"], scale: Float[Array, "*S N"], zero: Float[Array, "*S N"], dtype):
        return (codes.astype(jnp.float32) * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]).astype(dtype)


def masked_range(x: Float[Array, "*S N G"], keep: Bool[Array, "*S N G"]) -> tuple[Array, Array]:
    """(min, max) along the last axis over the entries `keep` marks, in float32 (0, 0 where it marks none)."""
    x32 = x.astype(jnp.float32)
    lo, hi = jnp.where(keep, x32, jnp.inf).min(-1), jnp.where(keep, x32, -jnp.inf).max(-1)
    some = keep.any(-1)
    return jnp.where(some, lo, 0.0), jnp.where(some, hi, 0.0)


FORMATS: dict[str, SlotFormat | GroupedFormat] = {
    f.name: f
    for f in (
        SlotFormat("float32", jnp.dtype(jnp.float32)),
        SlotFormat("bfloat16", jnp.dtype(jnp.bfloat16)),
        SlotFormat("int8", jnp.dtype(jnp.int8), 127.0),
        SlotFormat("fp8", jnp.dtype(jnp.float8_e4m3fn), 448.0),
        GroupedFormat("int4", 4),
        GroupedFormat("int2", 2),
    )
}


def slot_format(name: str) -> SlotFormat | GroupedFormat:
    """The format called `name` (one of `FORMATS`)."""
    if name not in FORMATS:
        raise ValueError(f"unknown kv_dtype {name!r}; the slot formats are {', '.join(FORMATS)}")
    return FORMATS[name]
