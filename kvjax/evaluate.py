"""Streaming perplexity: score a long text under a policy in constant memory.

The text is fed in chunks (`lax.scan`) through the fixed-capacity cache, and
each chunk's logits are reduced to the negative log-likelihood of the next
token before the next chunk, so memory is O(capacity + chunk x vocab).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from kvjax.cache import KVCache
from kvjax.policies.base import Policy
from kvjax.protocol import CachedDecoder
from kvjax.run import pad_to_chunks, scan_chunks


def stream_nll(
    model: CachedDecoder, tokens, *, policy: Policy, chunk_size: int = 128, key: jax.Array | None = None,
    with_cache: bool = False,
) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], KVCache]:
    """Per-token NLL of tokens[:, 1:] given their prefix, [B, T-1], in nats (and the final cache if asked)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, length >= 2], got shape {tokens.shape}")
    t = tokens.shape[1]
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    padded, valid = pad_to_chunks(tokens, jnp.ones(tokens.shape, bool), chunk_size)
    targets, _ = pad_to_chunks(targets, valid[:, :t], chunk_size)
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    cache = model.cache_spec().init(policy, tokens.shape[0])
    nll, cache = _stream_nll(graphdef, state, padded, valid, targets, key, cache, chunk_size=chunk_size)
    return (nll[:, : t - 1], cache) if with_cache else nll[:, : t - 1]


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _stream_nll(graphdef, state, tokens, valid, targets, key, cache, *, chunk_size):
    model = nnx.merge(graphdef, state)

    def next_token_nll(carry, hidden, val, tgt):
        logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
        return carry, -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]

    cache, _, nll = scan_chunks(model, tokens, valid, cache, key, next_token_nll, None, chunk_size=chunk_size, extras=(targets,))
    return jnp.moveaxis(nll, 0, 1).reshape(tokens.shape), cache


def perplexity(model: CachedDecoder, tokens, *, policy: Policy, chunk_size: int = 128, start: int = 0) -> float:
    """exp(mean NLL) of the tokens after position `start` (earlier ones are context only)."""
    nll = np.asarray(stream_nll(model, tokens, policy=policy, chunk_size=chunk_size))
    return float(np.exp(nll[:, start:].mean()))
