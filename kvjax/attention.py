"""Attention of a chunk of queries over (cache slots + the chunk itself).

This is the single attention entry point for decode (chunk of one) and chunked
prefill. The XLA path here is the reference and the CPU path; `impl` selects a
backend so Pallas kernels can serve GPU/TPU behind the same signature.

Keys are read once: logits over the cache and over the chunk are computed
separately and joined in one softmax, so the cache is never copied into a
concatenated buffer. When a policy needs per-slot statistics, the probability
mass each key receives (summed over the query heads of its KV group, weighted
per query) comes out of the same pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from beartype import beartype
from jaxtyping import Array, Bool, Float, Int, jaxtyped

IMPLS = ("xla", "pallas", "auto")


def resolve_impl(impl: str) -> str:
    """'auto' picks XLA on CPU; the Pallas path is reserved for GPU/TPU kernels."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "xla"
    if impl == "pallas":
        raise NotImplementedError(
            "impl='pallas': the Pallas kernels are not built yet (issue 4); use impl='xla' or 'auto'"
        )
    return impl


@jaxtyped(typechecker=beartype)
def attention(
    q: Float[Array, "B S Hq D"],
    k_cache: Float[Array, "B H C D"],
    v_cache: Float[Array, "B H C D"],
    cache_valid: Bool[Array, "B H C"],
    k_new: Float[Array, "B S H D"],
    v_new: Float[Array, "B S H D"],
    new_valid: Bool[Array, "B S"],
    *,
    scale: float,
    softcap: float | None = None,
    stat_weights: Float[Array, "B S"] | None = None,
    max_distance: int | None = None,
    cache_pos: Int[Array, "B H C"] | None = None,
    q_pos: Int[Array, "B S"] | None = None,
    impl: str = "xla",
) -> tuple[Float[Array, "B S Hq D"], Float[Array, "B H N"] | None]:
    """Softmax attention of `q` over valid cache slots and causally over the chunk.

    Query i of the chunk sees every valid cache slot and chunk keys j <= i that
    are valid; with `max_distance` (a sliding window) only keys at most that
    many positions back (positions from `cache_pos` and `q_pos`). Padding
    queries (`new_valid` False) return zeros.

    Returns the output and, if `stat_weights` is given, the attention mass per
    key, `mass[b, h, n] = sum_{g, s} w[b, s] * p[b, h*G+g, s, n]`, over the
    candidates n = (C cache slots, then S chunk tokens).
    """
    resolve_impl(impl)
    b, s, hq, d = q.shape
    h = k_cache.shape[1]
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    g = hq // h
    # [B, H, G*S, D]: per KV head a plain matmul against the cache, no transposes of K or V.
    qh = q.reshape(b, s, h, g, d).transpose(0, 2, 3, 1, 4).reshape(b, h, g * s, d)
    f32 = jnp.float32
    logits_c = jnp.einsum("bhqd,bhcd->bhqc", qh, k_cache, preferred_element_type=f32)
    logits_n = jnp.einsum("bhqd,bthd->bhqt", qh, k_new, preferred_element_type=f32)
    logits = jnp.concatenate([logits_c, logits_n], axis=-1).reshape(b, h, g, s, -1) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    c = k_cache.shape[2]
    causal = jnp.tril(jnp.ones((s, s), bool))[None] & new_valid[:, None, :]  # [B, S(q), S(k)]
    cache_mask = cache_valid[:, :, None, :]  # [B, H, S(q) or 1, C]
    if max_distance is not None:
        cache_mask = cache_mask & (q_pos[:, None, :, None] - cache_pos[:, :, None, :] <= max_distance)
        causal &= q_pos[:, :, None] - q_pos[:, None, :] <= max_distance
    mask = jnp.concatenate(
        [jnp.broadcast_to(cache_mask[:, :, None], (b, h, g, s, c)), jnp.broadcast_to(causal[:, None, None], (b, h, g, s, s))],
        axis=-1,
    )
    mask &= new_valid[:, None, None, :, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = logits.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows (padding queries)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    ph = p.reshape(b, h, g * s, c + s)
    out = jnp.einsum("bhqc,bhcd->bhqd", ph[..., :c].astype(v_cache.dtype), v_cache, preferred_element_type=f32)
    out += jnp.einsum("bhqt,bthd->bhqd", ph[..., c:].astype(v_new.dtype), v_new, preferred_element_type=f32)
    out = out.reshape(b, h, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, hq, d).astype(q.dtype)
    mass = None
    if stat_weights is not None:
        mass = jnp.einsum("bhgsn,bs->bhn", p, stat_weights.astype(f32))
    return out, mass

