"""Prefill + decode under one `jax.jit`, with the cache donated.

The jitted function's static arguments (model graph, policy, sampler, sizes)
are frozen and hashable, so one compiled program serves every prompt in a
length bucket (prompt padded up to a multiple of `chunk_size`) and any number
of generated tokens up to `max_new_tokens`. Model parameters travel as a
pytree (`nnx.split` once, `nnx.merge` inside the trace), which avoids
`nnx.jit`'s per-call overhead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Int

from kvjax.cache import KVCache
from kvjax.policies.base import Policy
from kvjax.protocol import CachedDecoder
from kvjax.run import forward_chunk, pad_to_chunks, prefill
from kvjax.sampling import Sampler


@struct.dataclass
class GenerateOutput:
    """tokens: [B, max_new_tokens] (pad_id after a row stops); lengths: [B]
    tokens generated per row (a stop token included); cache: the final cache."""

    tokens: Int[Array, "B N"]
    lengths: Int[Array, " B"]
    cache: KVCache


@struct.dataclass
class _DecodeState:
    i: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    logits: jax.Array
    cache: KVCache
    key: jax.Array


def _prompt_mask(prompt, prompt_lengths, prompt_mask) -> np.ndarray:
    b, p = prompt.shape
    if prompt_mask is not None and prompt_lengths is not None:
        raise ValueError("pass prompt_lengths (right padding) or prompt_mask (any padding), not both")
    if prompt_mask is not None:
        mask = np.asarray(prompt_mask)
        if mask.shape != (b, p) or mask.dtype != bool:
            raise ValueError(f"prompt_mask must be a bool array of shape {(b, p)}, got {mask.dtype} {mask.shape}")
    elif prompt_lengths is not None:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_lengths must be {b} ints (one per row), got {lengths.dtype} {lengths.shape}")
        if (lengths < 0).any() or (lengths > p).any():
            raise ValueError(f"prompt_lengths must lie in [1, {p}], got {lengths.tolist()}")
        mask = np.arange(p)[None, :] < lengths[:, None]
    else:
        mask = np.ones((b, p), bool)
    empty = np.flatnonzero(~mask.any(-1))
    if empty.size:
        raise ValueError(f"prompt rows {empty.tolist()} have no valid token; every row needs at least one")
    return mask


def generate(
    model: CachedDecoder,
    prompt,
    *,
    policy: Policy,
    max_new_tokens: int,
    prompt_lengths=None,
    prompt_mask=None,
    sampler: Sampler = Sampler(),
    stop_tokens: tuple[int, ...] = (),
    key: jax.Array | None = None,
    chunk_size: int = 64,
    pad_id: int = 0,
    impl: str = "xla",
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row with a fixed-capacity cache.

    prompt: [B, P] int token ids. Rows may be padded on either side: give
    `prompt_lengths` [B] (right padding) or `prompt_mask` [B, P] (True = real
    token, any pattern). Padding never takes a slot, a position or attention.
    A row stops after emitting one of `stop_tokens`.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be [batch, length] token ids, got shape {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a kvjax Policy (see kvjax.policies.make), got {type(policy).__name__}")
    mask = _prompt_mask(prompt, prompt_lengths, prompt_mask)
    cache = model.cache_spec().init(policy, prompt.shape[0])
    for layer_policy in cache.policies:
        layer_policy.check_length(int(mask.sum(-1).max()) + max_new_tokens)
    tokens, valid = pad_to_chunks(prompt.astype(jnp.int32), jnp.asarray(mask), chunk_size, pad_id)
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    return _generate(
        graphdef, state, tokens, valid, cache, key,
        sampler=sampler, stop_tokens=tuple(int(t) for t in stop_tokens),
        max_new_tokens=max_new_tokens, chunk_size=chunk_size, pad_id=pad_id, impl=impl,
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "sampler", "stop_tokens", "max_new_tokens", "chunk_size", "pad_id", "impl"),
    donate_argnames=("cache",),
)
def _generate(graphdef, state, tokens, valid, cache, key, *, sampler, stop_tokens, max_new_tokens, chunk_size, pad_id, impl):
    model = nnx.merge(graphdef, state)
    key, prefill_key = jax.random.split(key)
    last, cache = prefill(model, tokens, valid, cache, prefill_key, chunk_size=chunk_size, impl=impl)
    b = tokens.shape[0]
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def body(st: _DecodeState) -> _DecodeState:
        key, sample_key, step_key = jax.random.split(st.key, 3)
        tok = jnp.where(st.done, pad_id, sampler(st.logits, sample_key))
        lengths = st.lengths + ~st.done
        done = st.done | jnp.isin(tok, stops)
        hidden, cache = forward_chunk(model, tok[:, None], ~st.done[:, None], st.cache, step_key, prefill=False, impl=impl)
        return _DecodeState(
            i=st.i + 1, tokens=st.tokens.at[:, st.i].set(tok), lengths=lengths, done=done,
            logits=model.logits(hidden[:, 0]).astype(jnp.float32), cache=cache, key=key,
        )

    def cond(st: _DecodeState):
        return (st.i < max_new_tokens) & ~st.done.all()

    st = _DecodeState(
        i=jnp.int32(0), tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
        logits=model.logits(last).astype(jnp.float32), cache=cache, key=key,
    )
    st = jax.lax.while_loop(cond, body, st)
    return GenerateOutput(tokens=st.tokens, lengths=st.lengths, cache=st.cache)

