"""Feed tokens to a cached decoder: one chunk, or a long input in fixed chunks.

Long inputs are consumed with `lax.scan` over chunks of a static size, each
attending to the cache and itself and then compressed into the cache, so peak
memory is O(capacity + chunk) whatever the input length. The cache carries
its policy (`CacheSpec.init`), so none is passed here.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jaxtyping import Array, Bool, Float, Int

from kvjax.cache import KVCache
from kvjax.inputs import check_ids, is_traced
from kvjax.policies.base import Step
from kvjax.protocol import CachedDecoder


def make_step(cache: KVCache, valid: Bool[Array, "B S"], key, *, prefill: bool, impl: str = "auto") -> Step:
    """Positions continue from `cache.seen`; padding takes no position."""
    positions = cache.seen[:, None] + jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1
    return Step(seen=cache.seen, positions=positions, new_valid=valid, key=key, prefill=prefill, impl=impl)


def forward_chunk(
    model: CachedDecoder, tokens: Int[Array, "B S"], valid: Bool[Array, "B S"], cache: KVCache,
    key, *, prefill: bool, impl: str = "auto",
) -> tuple[Float[Array, "B S d"], KVCache]:
    """Run one chunk through the model and advance `cache.seen`."""
    step = make_step(cache, valid, key, prefill=prefill, impl=impl)
    hidden, cache = model(tokens, cache, step)
    return hidden, cache.replace(seen=step.seen_after)


def chunked(x: Array, chunk: int) -> Array:
    """[B, T] -> [T // chunk, B, chunk] for `lax.scan`."""
    if x.shape[1] % chunk:
        raise ValueError(f"length {x.shape[1]} is not a multiple of chunk_size={chunk}; pad it (see pad_to_chunks)")
    return rearrange(x, "b (n c) ... -> n b c ...", c=chunk)


def pad_to_chunks(tokens: Array, valid: Array, chunk: int, pad_id: int = 0) -> tuple[Array, Array]:
    """Right-pad to a multiple of `chunk` with invalid tokens (the length bucket)."""
    extra = -tokens.shape[1] % chunk
    tokens = jnp.pad(tokens, ((0, 0), (0, extra)), constant_values=pad_id)
    return tokens, jnp.pad(valid, ((0, 0), (0, extra)))


def scan_chunks(
    model: CachedDecoder, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"], cache: KVCache,
    key, fn: Callable, init, *, chunk_size: int, extras: tuple[Array, ...] = (), impl: str = "auto",
):
    """Feed [B, T] tokens through the model chunk by chunk (`lax.scan`).

    After each chunk, `fn(carry, hidden, valid, *extras)` (chunk slices, [B, S, ...])
    reduces the hidden states: it returns the new carry and a per-chunk output.
    Returns (cache, carry, outputs stacked over chunks).
    """
    keys = jax.random.split(key, tokens.shape[1] // chunk_size)

    def body(state, xs):
        cache, carry = state
        tok, val, k, *ex = xs
        hidden, cache = forward_chunk(model, tok, val, cache, k, prefill=True, impl=impl)
        carry, out = fn(carry, hidden, val, *ex)
        return (cache, carry), out

    xs = (chunked(tokens, chunk_size), chunked(valid, chunk_size), keys, *(chunked(e, chunk_size) for e in extras))
    (cache, carry), outs = jax.lax.scan(body, (cache, init), xs)
    return cache, carry, outs


def prefill(
    model: CachedDecoder, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"], cache: KVCache,
    key, *, chunk_size: int, impl: str = "auto",
) -> tuple[Float[Array, "B d"], KVCache]:
    """Consume a prompt in chunks; return each row's last valid hidden state and the cache.
    Concrete token ids are checked against the vocabulary (traced ones cannot be; see `kvjax.inputs`)."""
    if not is_traced(tokens) and not is_traced(valid):
        check_ids(tokens, np.asarray(valid), model.vocab_size, "prefill tokens")

    def keep_last(last, hidden, val):
        idx = chunk_size - 1 - jnp.argmax(val[:, ::-1], axis=-1)  # last valid index in the chunk
        h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
        return jnp.where(val.any(-1)[:, None], h.astype(last.dtype), last), None

    last0 = jnp.zeros((tokens.shape[0], model.hidden_size), jnp.float32)
    cache, last, _ = scan_chunks(model, tokens, valid, cache, key, keep_last, last0, chunk_size=chunk_size, impl=impl)
    return last, cache
