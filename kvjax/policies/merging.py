"""Helpers shared by the merging policies (BCT, KVMerger)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def cosine(a: Float[Array, "*B D"], b: Float[Array, "*B D"]) -> Float[Array, "*B"]:
    """Cosine similarity in f32 (0 for a zero vector)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norm = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.where(norm > 0, (a * b).sum(-1) / jnp.where(norm > 0, norm, 1.0), 0.0)
