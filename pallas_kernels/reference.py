"""Pure-jnp reference for `cache_attention`: one masked softmax over (cache slots + chunk).

This is also kvjax's XLA path (`impl="xla"`), the CPU path: one source of
truth that the kernels are tested against. Keys are read once: logits over the
cache and over the chunk are computed separately and joined in one softmax, so
the cache is never copied into a concatenated buffer. Both products over the
cache are written slot-major ([slots, rows], transposed after; the logits are
small beside the keys): XLA CPU runs them about 1.5x faster that way than
row-major at 16k slots and 4 rows per KV head (measured, JAX 0.10.2).

Narrow slots (int8 / fp8 data with per-slot f32 `k_scale` / `v_scale`,
`kvjax.quant`) are read as stored: each key's scale multiplies its logit and
each value's scale its probability. XLA CPU still widens the data to the
queries' dtype before each product (see `widened`).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.blocks import widen
from pallas_kernels.shapes import Array, Bool, Float, Int

F32 = jnp.float32


def widened(x: Array, q: Array) -> Array:
    """Slots `x` in the queries' dtype, the conversion tied to `q` (+ 0 * tanh(sum q)).

    Untied, a conversion depends on the cache alone, and XLA CPU schedules every
    layer's at the start of the step, where they run together with all their
    buffers live: 19.8 ms instead of 3.4 ms for a decode step over 16k int8
    slots in 4 layers (measured, JAX 0.10.2). Tied, each layer converts when it
    runs. Finite queries add exactly 0. The conversion is the kernels' (`blocks.widen`)."""
    if x.dtype == q.dtype:
        return x
    return widen(x, q) + (0 * jnp.tanh(q.astype(F32).sum())).astype(q.dtype)


def cache_attention_reference(
    q: Float[Array, "B H R D"],
    k_cache: Array,
    v_cache: Array,
    cache_valid: Bool[Array, "B H C"],
    k_new: Float[Array, "B H S D"],
    v_new: Float[Array, "B H S D"],
    new_valid: Bool[Array, "B S"],
    *,
    group: int,
    scale: float,
    softcap: float | None = None,
    max_distance: int | None = None,
    cache_pos: Int[Array, "B H C"] | None = None,
    q_pos: Int[Array, "B S"] | None = None,
    stat_weights: Float[Array, "B S"] | None = None,
    k_scale: Float[Array, "B H C"] | None = None,
    v_scale: Float[Array, "B H C"] | None = None,
) -> tuple[Float[Array, "B H R D"], Float[Array, "B H R"], Float[Array, "B H N"] | None]:
    """Rows r = s * group + g (token s, head g of the KV group) attend to valid cache
    slots and causally to valid chunk keys (within `max_distance` positions if given);
    padding rows output zeros with lse = -inf. Returns (out, lse, mass) where
    `mass[b, h, n] = sum_r w[b, r // group] p[b, h, r, n]` over n = (C slots, S chunk keys).
    With `k_scale` / `v_scale`, slot c holds k_cache[c] * k_scale[c] (and so for v).
    """
    b, h, rows, _ = q.shape
    s_len, c = k_new.shape[2], k_cache.shape[2]
    token = jnp.arange(rows) // group
    cache_logits = jnp.einsum("bhcd,bhrd->bhcr", widened(k_cache, q), q, preferred_element_type=F32)
    if k_scale is not None:
        cache_logits = cache_logits * k_scale[..., None]
    logits = jnp.concatenate(
        [cache_logits.swapaxes(-1, -2),
         jnp.einsum("bhrd,bhtd->bhrt", q, k_new, preferred_element_type=F32)], axis=-1) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    causal = (jnp.arange(s_len)[None, :] <= token[:, None])[None] & new_valid[:, None, :]  # [B, R, S]
    cache_mask = cache_valid[:, :, None, :]  # [B, H, 1, C]
    if max_distance is not None:
        row_pos = q_pos[:, token]
        cache_mask = cache_mask & (row_pos[:, None, :, None] - cache_pos[:, :, None, :] <= max_distance)
        causal &= row_pos[:, :, None] - q_pos[:, None, :] <= max_distance
    mask = jnp.concatenate(
        [jnp.broadcast_to(cache_mask, (b, h, rows, c)), jnp.broadcast_to(causal[:, None], (b, h, rows, s_len))], axis=-1)
    mask &= new_valid[:, token][:, None, :, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = logits.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows (padding queries)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    den = p.sum(-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    lse = jnp.where(den > 0, jnp.log(jnp.where(den > 0, den, 1.0)) + m, -jnp.inf)[..., 0]
    p_cache = p[..., :c].swapaxes(-1, -2)
    if v_scale is not None:
        p_cache = p_cache * v_scale[..., None]
    v_cache = widened(v_cache, q)
    out = jnp.einsum("bhcr,bhcd->bhrd", p_cache.astype(v_cache.dtype), v_cache, preferred_element_type=F32)
    out += jnp.einsum("bhrt,bhtd->bhrd", p[..., c:].astype(v_new.dtype), v_new, preferred_element_type=F32)
    mass = None
    if stat_weights is not None:
        mass = jnp.einsum("bhrn,br->bhn", p, stat_weights.astype(F32)[:, token])
    return out.astype(q.dtype), lse, mass
