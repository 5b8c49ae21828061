"""Rotary position embedding (Su et al., arXiv 2104.09864).

kvjax applies RoPE itself (models hand it pre-RoPE queries and keys) because
the position a key is rotated at is a policy decision: its original position
(H2O, SnapKV, TOVA, ...) or its position inside the cache (StreamingLLM).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kvjax.select import unfused

# Rotations of at least this many positions take their cos and sin tables in buffers of their own
# (`select.unfused`) when they rotate several heads per position; for fewer (a decode step's
# token) the conditional costs more than evaluating the tables once per head.
TABLES_MIN_POSITIONS = 64


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's frequency-dependent RoPE rescaling (rope_type "llama3").

    Wavelengths longer than original_context / low_freq_factor are divided by
    `factor`, shorter than original_context / high_freq_factor kept, and the
    band between interpolated linearly in original_context / wavelength.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def __call__(self, inv_freq):
        wavelen = 2 * jnp.pi / inv_freq
        ratio = self.original_context / wavelen
        smooth = jnp.clip((ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor), 0.0, 1.0)
        return (1 - smooth) * inv_freq / self.factor + smooth * inv_freq


@dataclasses.dataclass(frozen=True)
class Rope:
    """Static RoPE settings.

    theta: frequency base.
    interleaved: rotate adjacent pairs (GPT-J / GGUF layout) instead of the two
        halves of the head dimension (Hugging Face Llama layout).
    scaling: optional frequency rescaling (Llama 3.1).
    """

    theta: float = 10_000.0
    interleaved: bool = False
    scaling: Llama3Scaling | None = None

    def inv_freq(self, head_dim: int) -> Float[Array, " half"]:
        inv = 1.0 / (self.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        return inv if self.scaling is None else self.scaling(inv)

    def __call__(self, x: Float[Array, "*lead D"], positions: Int[Array, "*lead"]) -> Float[Array, "*lead D"]:
        """Rotate `x` at `positions` (same leading shape); computed in f32, returned in x.dtype."""
        angles = positions[..., None].astype(jnp.float32) * self.inv_freq(x.shape[-1])
        tables = lambda a: (jnp.cos(a), jnp.sin(a))  # noqa: E731
        shared = x.size > 2 * angles.size  # a table entry rotates several heads' pairs
        cos, sin = unfused(tables, angles) if shared and positions.size >= TABLES_MIN_POSITIONS else tables(angles)
        xf = x.astype(jnp.float32)
        if self.interleaved:
            a, b = xf[..., 0::2], xf[..., 1::2]
            out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
        else:
            a, b = jnp.split(xf, 2, axis=-1)
            out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
        return out.astype(x.dtype)
