"""Attention of a chunk of queries over (cache slots + the chunk itself).

The single attention entry point for decode (chunk of one) and chunked
prefill. It checks shapes, lays queries out as rows (token, head-in-group) per
KV head, and dispatches: `impl="xla"` runs `pallas_kernels.cache_attention_reference`
(the reference and the CPU path), `impl="pallas"` the Pallas kernels
(interpreted on CPU), `impl="auto"` the kernels on GPU/TPU and XLA on CPU. When
a policy needs per-slot statistics, the probability mass each key receives
(summed over the query heads of its KV group, weighted per query) comes out of
the same pass.
"""

from __future__ import annotations

import jax
from beartype import beartype
from jaxtyping import Array, Bool, Float, Int, jaxtyped

from pallas_kernels import cache_attention, cache_attention_reference

IMPLS = ("xla", "pallas", "auto")


def resolve_impl(impl: str) -> str:
    """'auto' picks the Pallas kernels on GPU/TPU and XLA on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
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
    impl = resolve_impl(impl)
    b, s, hq, d = q.shape
    h = k_cache.shape[1]
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    g = hq // h
    rows = q.reshape(b, s, h, g, d).transpose(0, 2, 1, 3, 4).reshape(b, h, s * g, d)
    fn = cache_attention if impl == "pallas" else cache_attention_reference
    out, _, mass = fn(
        rows, k_cache, v_cache, cache_valid, k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3), new_valid,
        group=g, scale=scale, softcap=softcap, max_distance=max_distance, cache_pos=cache_pos, q_pos=q_pos,
        stat_weights=stat_weights,
    )
    return out.reshape(b, h, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b, s, hq, d), mass
