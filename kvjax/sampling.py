"""Next-token sampling: greedy, or temperature with optional top-k / top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static, hashable sampling settings (a `jax.jit` static argument).

    temperature: 0 picks the most likely token (greedy, no key needed); T > 0
        samples from softmax(logits / T) (finite; `generate` then needs a key).
    top_k: sample among the k most likely tokens only (None: all).
    top_p: nucleus sampling, among the most likely tokens whose mass reaches p (None: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    def __call__(self, logits: Float[Array, "B V"], key: jax.Array) -> Int[Array, " B"]:
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None:
            desc = jnp.sort(logits, axis=-1)[..., ::-1]
            probs = jax.nn.softmax(desc, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
            cutoff = jnp.where(before < self.top_p, desc, jnp.inf).min(-1, keepdims=True)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
