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
from kvjax.inputs import prng_key, token_batch
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


def generate(
    model: CachedDecoder,
    prompt,
    *,
    policy: Policy,
    max_new_tokens: int,
    prompt_lengths=None,
    prompt_mask=None,
    sampler: Sampler = Sampler(),
    stop_tokens: int | tuple[int, ...] = (),
    key: jax.Array | int | None = None,
    chunk_size: int = 64,
    pad_id: int = 0,
    impl: str = "xla",
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row with a fixed-capacity cache.

    prompt: [B, P] int token ids, or a list of B rows of different lengths
    (padded here). Rows of an array may be padded on either side: give
    `prompt_lengths` [B] (right padding) or `prompt_mask` [B, P] (True = real
    token, any pattern). Padding never takes a slot, a position or attention.
    A row stops after emitting one of `stop_tokens` (an id or a tuple of ids).
    key: `jax.random.key(seed)` or an int seed; required when sampling (temperature > 0).

    Returns `GenerateOutput`: `tokens` [B, max_new_tokens] the generated ids
    (`pad_id` after a row stopped), `lengths` [B] how many each row generated
    (its stop token included), `cache` the final cache.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a kvjax Policy (see kvjax.policies.make), got {type(policy).__name__}")
    stop_tokens = (stop_tokens,) if isinstance(stop_tokens, (int, np.integer)) else tuple(stop_tokens)
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in stop_tokens):
        raise TypeError(f"stop_tokens must be a token id or a tuple of ids, got {stop_tokens!r}")
    key = prng_key(key, needed=sampler.temperature > 0, what=f"sampling with temperature={sampler.temperature}")
    prompt, mask = token_batch(prompt, vocab_size=model.vocab_size, lengths=prompt_lengths, mask=prompt_mask,
                               name="prompt", lengths_name="prompt_lengths", mask_name="prompt_mask")
    cache = model.cache_spec().init(policy, prompt.shape[0])
    for layer_policy in cache.policies:
        layer_policy.check_length(int(mask.sum(-1).max()) + max_new_tokens)
    tokens, valid = pad_to_chunks(jnp.asarray(prompt), jnp.asarray(mask), chunk_size, pad_id)
    graphdef, state = nnx.split(model)
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

