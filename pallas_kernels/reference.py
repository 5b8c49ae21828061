"""Pure-jnp reference for `cache_attention`: one masked softmax over (cache slots + chunk).

`cache_attention_reference` is the source of truth the kernels are tested
against. kvjax's XLA path (`impl="xla"`, the CPU path) is the same softmax with
less read, `cache_attention_xla`: a block of a prefill chunk's rows skips the
chunk keys after its last token and keeps its logits cache-sized, and a prefill
chunk skips the slots after the cache's last valid one.

Two layouts, chosen by the rows a call has (XLA CPU, JAX 0.10.2, measured):
- a decode step (a few rows per KV head, the logits small beside the keys)
  reads the keys once: logits over the cache and over the chunk are computed
  separately and joined in one softmax, so the cache is never copied into a
  concatenated buffer. The logits product over the cache is written slot-major
  ([slots, rows], transposed after; 13-14 against 9-11 GB/s row-major at 4k-16k
  slots and 3-4 rows per KV head), the output product takes the probabilities
  row-major as the softmax leaves them (16-19 GB/s, where transposing them back
  for a slot-major product ran at 10-14): a `full` decode step of the bench
  model over 64k slots took 18.5 ms instead of 19.2-26.5;
- a prefill chunk (hundreds of rows, the logits larger than the keys) joins
  the slots it reads and the chunk's keys and values first, so one row-major
  product gives the logits and one the output, with no transpose or join of
  logits-sized arrays: SmolLM2's 1,024-token prefill attention per layer took
  17.5 ms instead of 30.5 ms.
Both leave the probabilities unnormalized and divide the output (and the
weights of the attention mass) by the row sums, one pass over the logits less.

Narrow slots (int8 / fp8 data with per-slot f32 `k_scale` / `v_scale`,
`kvjax.quant`) are read as stored: each key's scale multiplies its logit and
each value's scale its probability. XLA CPU still widens the data to the
queries' dtype before each product (see `widened`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import extent, widen
from pallas_kernels.shapes import Array, Bool, Float, Int

F32 = jnp.float32
# One row block's f32 logits in `cache_attention_xla`: a few MiB, which the CPU's caches hold. On this 2-core
# machine (JAX 0.10.2), a 1,024-token chunk over 1,040 slots ([1, 3, 3072, 2064] logits, SmolLM2's heads) took
# 153 ms in one block and 82 ms in blocks of 128 tokens; a 256-token chunk 17 ms and 11 ms.
LOGITS_BLOCK_BYTES = 8 << 20
MAX_ROW_BLOCKS = 4
# Caches this large are read only up to their last valid slot in prefill (`cache_prefixes`).
PREFIX_MIN_SLOTS = 512


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
    token = jnp.arange(q.shape[2]) // group
    return _rows_attention(q, token, k_cache, v_cache, cache_valid, k_new, v_new, new_valid, scale=scale, softcap=softcap,
                           max_distance=max_distance, cache_pos=cache_pos, q_pos=q_pos, stat_weights=stat_weights,
                           k_scale=k_scale, v_scale=v_scale)


def block_tokens(batch: int, heads: int, group: int, capacity: int, chunk: int) -> int:
    """Chunk tokens per row block of `cache_attention_xla`: as many as keep one block's f32 logits
    ([batch, heads, tokens * group, capacity + chunk]) within `LOGITS_BLOCK_BYTES`, but no more than
    `MAX_ROW_BLOCKS` blocks (each is compiled on its own, in every layer)."""
    per_token = batch * heads * group * (capacity + chunk) * 4
    return max(-(-chunk // MAX_ROW_BLOCKS), min(chunk, LOGITS_BLOCK_BYTES // per_token))


def cache_prefixes(capacity: int, chunk: int) -> tuple[int, ...]:
    """The cache lengths `cache_attention_xla` may stop reading at: for a prefill chunk over at least
    `PREFIX_MIN_SLOTS` slots, none, half or all of them; else all. Each is a branch compiled in
    every layer: SmolLM2's 1,024-token `full` prefill (chunks of 256) compiled in 13 s with these,
    20 s with quarters (2% faster to run) and 5 s without branches (1.3x slower to run)."""
    if chunk == 1 or capacity < PREFIX_MIN_SLOTS:
        return (capacity,)
    return (0, -(-capacity // 2), capacity)


def cache_attention_xla(q, k_cache, v_cache, cache_valid, k_new, v_new, new_valid, *, group: int,
                        cache_pos=None, stat_weights=None, k_scale=None, v_scale=None, tokens: int | None = None,
                        prefixes: tuple[int, ...] | None = None, **settings):
    """`cache_attention_reference` as kvjax's XLA path: the same softmax, with less read.

    - Rows in blocks of `tokens` chunk tokens (default `block_tokens`): a block attends to the
      chunk keys up to its last token only (the later ones are masked for all its rows), so a
      prefill chunk reads about half of its own keys, and a block's logits fit the CPU's caches.
    - Slots past the last valid one are not read: the program has one branch per length in
      `prefixes` (default `cache_prefixes`) and runs the shortest that holds every valid slot.
      A `full` cache fills its slots in order, so its prefill reads what it holds, not its capacity.
    Same arguments and results as the reference (masked keys add exact zeros; the sums' order
    differs, so results agree to float rounding)."""
    b, h = q.shape[:2]
    c, s = k_cache.shape[2], k_new.shape[2]
    k_cache, v_cache = widened(k_cache, q), widened(v_cache, q)  # once, not per row block
    tokens = tokens or block_tokens(b, h, group, c, s)
    prefixes = prefixes or cache_prefixes(c, s)
    lead = ((0, 0), (0, 0))  # no padding on the batch and head axes

    def read(prefix: int):
        cut = lambda x: None if x is None else x[:, :, :prefix]  # noqa: E731
        outs, lses, mass = [], [], None
        for first in range(0, s, tokens):
            end = min(s, first + tokens)
            out, lse, part = (_rows_attention if s == 1 else _joined_rows_attention)(
                q[:, :, first * group:end * group], jnp.arange(first, end).repeat(group), cut(k_cache), cut(v_cache),
                cut(cache_valid), k_new[:, :, :end], v_new[:, :, :end], new_valid, cache_pos=cut(cache_pos),
                stat_weights=stat_weights, k_scale=cut(k_scale), v_scale=cut(v_scale), **settings)
            outs.append(out)
            lses.append(lse)
            if part is not None:  # [slots read, chunk keys read] -> [C, S], zeros for the rest
                part = jnp.concatenate([jnp.pad(part[..., :prefix], (*lead, (0, c - prefix))),
                                        jnp.pad(part[..., prefix:], (*lead, (0, s - end)))], axis=-1)
                mass = part if mass is None else mass + part
        return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2), mass

    if list(prefixes) != sorted(set(prefixes)) or prefixes[0] < 0 or prefixes[-1] != c:
        raise ValueError(f"prefixes must be increasing slot counts ending at the capacity ({c}), got {prefixes}")
    if len(prefixes) == 1:
        return read(c)
    branch = jnp.searchsorted(jnp.asarray(prefixes), jnp.max(extent(cache_valid)))
    return jax.lax.switch(branch, [lambda p=p: read(p) for p in prefixes])


def _rows_attention(q: Float[Array, "B H R D"], token: Int[Array, " R"], k_cache, v_cache, cache_valid, k_new, v_new,
                    new_valid, *, scale: float, softcap=None, max_distance=None, cache_pos=None, q_pos=None,
                    stat_weights=None, k_scale=None, v_scale=None) -> tuple[Array, Array, Array | None]:
    """The reference's softmax for rows whose chunk tokens are `token`, over the cache slots and the
    first T chunk keys of `k_new` / `v_new` (T past the last row's token: later keys are masked for
    these rows anyway). Other arguments as `cache_attention_reference`'s; the mass is over C + T keys."""
    b, h, rows, _ = q.shape
    t_len, c = k_new.shape[2], k_cache.shape[2]
    key_valid, key_pos = new_valid[:, :t_len], None if q_pos is None else q_pos[:, :t_len]
    cache_logits = jnp.einsum("bhcd,bhrd->bhcr", widened(k_cache, q), q, preferred_element_type=F32)
    if k_scale is not None:
        cache_logits = cache_logits * k_scale[..., None]
    logits = jnp.concatenate(
        [cache_logits.swapaxes(-1, -2),
         jnp.einsum("bhrd,bhtd->bhrt", q, k_new, preferred_element_type=F32)], axis=-1) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    causal = (jnp.arange(t_len)[None, :] <= token[:, None])[None] & key_valid[:, None, :]  # [B, R, T]
    cache_mask = cache_valid[:, :, None, :]  # [B, H, 1, C]
    if max_distance is not None:
        row_pos = q_pos[:, token]
        cache_mask = cache_mask & (row_pos[:, None, :, None] - cache_pos[:, :, None, :] <= max_distance)
        causal &= row_pos[:, :, None] - key_pos[:, None, :] <= max_distance
    mask = jnp.concatenate(
        [jnp.broadcast_to(cache_mask, (b, h, rows, c)), jnp.broadcast_to(causal[:, None], (b, h, rows, t_len))], axis=-1)
    mask &= new_valid[:, token][:, None, :, None]
    p, inv, lse = _unnormalized_softmax(logits, mask)
    p_cache = p[..., :c]
    if v_scale is not None:
        p_cache = p_cache * v_scale[:, :, None, :]
    v_cache = widened(v_cache, q)
    out = jnp.einsum("bhrc,bhcd->bhrd", p_cache.astype(v_cache.dtype), v_cache, preferred_element_type=F32)
    out += jnp.einsum("bhrt,bhtd->bhrd", p[..., c:].astype(v_new.dtype), v_new, preferred_element_type=F32)
    return (out * inv).astype(q.dtype), lse, _mass(p, inv, stat_weights, token)


def _joined_rows_attention(q: Float[Array, "B H R D"], token: Int[Array, " R"], k_cache, v_cache, cache_valid, k_new, v_new,
                           new_valid, *, scale: float, softcap=None, max_distance=None, cache_pos=None, q_pos=None,
                           stat_weights=None, k_scale=None, v_scale=None) -> tuple[Array, Array, Array | None]:
    """`_rows_attention` for many rows (a prefill chunk): the slots and the first T chunk keys are joined
    into one key and one value array (scales applied to the widened slots), so the logits and the output
    are each one row-major product. Same arguments and results."""
    b, h, _, _ = q.shape
    t_len, c = k_new.shape[2], k_cache.shape[2]
    k_slots, v_slots = widened(k_cache, q), widened(v_cache, q)
    if k_scale is not None:
        k_slots = k_slots * k_scale[..., None].astype(q.dtype)
    if v_scale is not None:
        v_slots = v_slots * v_scale[..., None].astype(q.dtype)
    keys = jnp.concatenate([k_slots, k_new.astype(q.dtype)], axis=2)  # [B, H, C + T, D]
    values = jnp.concatenate([v_slots, v_new.astype(q.dtype)], axis=2)
    logits = jnp.einsum("bhrd,bhnd->bhrn", q, keys, preferred_element_type=F32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    chunk_valid = jnp.broadcast_to(new_valid[:, None, :t_len], (b, h, t_len))
    key_token = jnp.concatenate([jnp.full((c,), -1, jnp.int32), jnp.arange(t_len, dtype=jnp.int32)])  # slots: -1, seen by all
    mask = jnp.concatenate([cache_valid, chunk_valid], axis=-1)[:, :, None, :] & (key_token[None, :] <= token[:, None])
    if max_distance is not None:
        key_pos = jnp.concatenate([cache_pos, jnp.broadcast_to(q_pos[:, None, :t_len], (b, h, t_len))], axis=-1)
        mask &= q_pos[:, token][:, None, :, None] - key_pos[:, :, None, :] <= max_distance
    mask &= new_valid[:, token][:, None, :, None]
    p, inv, lse = _unnormalized_softmax(logits, mask)
    out = jnp.einsum("bhrn,bhnd->bhrd", p.astype(values.dtype), values, preferred_element_type=F32)
    return (out * inv).astype(q.dtype), lse, _mass(p, inv, stat_weights, token)


def _unnormalized_softmax(logits: Float[Array, "B H R N"], mask: Bool[Array, "B H R N"]):
    """exp(logits - row max) where `mask` (zeros elsewhere), 1 / row sum (1 for a fully masked row:
    a padding query, whose output is then zero) and the log-sum-exp (-inf for a fully masked row)."""
    logits = jnp.where(mask, logits, -jnp.inf)
    m = logits.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)  # exactly 0 where masked
    den = p.sum(-1, keepdims=True)
    lse = jnp.where(den > 0, jnp.log(jnp.where(den > 0, den, 1.0)) + m, -jnp.inf)[..., 0]
    return p, 1.0 / jnp.where(den > 0, den, 1.0), lse


def _mass(p, inv, stat_weights, token):
    """`mass[b, h, n] = sum_r w[b, token[r]] p[b, h, r, n] / den[b, h, r]`, or None without weights."""
    if stat_weights is None:
        return None
    return jnp.einsum("bhrn,bhr->bhn", p, stat_weights.astype(F32)[:, None, token] * inv[..., 0])
