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
from kvjax.inputs import prng_key, token_batch
from kvjax.policies.base import Policy
from kvjax.protocol import CachedDecoder
from kvjax.run import pad_to_chunks, scan_chunks
from kvjax.sharding import mesh_context, on_model_mesh


def stream_nll(
    model: CachedDecoder, tokens, *, policy: Policy, mask=None, chunk_size: int = 128, key: jax.Array | int | None = None,
    with_cache: bool = False, impl: str = "auto",
) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], KVCache]:
    """Per-token NLL in nats, [B, T-1]: entry j scores the row's next real token after position j,
    given every real token up to j (for a full rectangular batch: tokens[:, j + 1] given tokens[:, :j + 1]).

    tokens: [B, T] ids or a list of rows of different lengths; `mask` [B, T] marks
    real tokens of an array (any padding). Entries with no next token are NaN.
    Returns the final cache too with `with_cache`. `impl` picks attention ("auto":
    Pallas kernels on GPU/TPU, XLA on CPU; or "xla", "pallas").
    """
    ids, real = token_batch(tokens, vocab_size=model.vocab_size, mask=mask)
    short = np.flatnonzero(real.sum(-1) < 2)
    if short.size:
        raise ValueError(f"tokens rows {short.tolist()} have fewer than 2 tokens: nothing to predict")
    b, t = ids.shape
    targets, scored = np.zeros_like(ids), np.zeros(real.shape, bool)
    for row in range(b):
        at = np.flatnonzero(real[row])
        targets[row, at[:-1]], scored[row, at[:-1]] = ids[row, at[1:]], True
    cache = model.cache_spec().init(policy, b)
    for layer_policy in cache.policies:
        layer_policy.check_length(int(real.sum(-1).max()), what="the text's length")
    padded, valid = pad_to_chunks(jnp.asarray(ids), jnp.asarray(real), chunk_size)
    targets, _ = pad_to_chunks(jnp.asarray(targets), valid[:, :t], chunk_size)
    cache, padded, valid, targets = on_model_mesh(model, cache, padded, valid, targets)
    graphdef, state = nnx.split(model)
    with mesh_context(model):
        nll, cache = _stream_nll(graphdef, state, padded, valid, targets, prng_key(key, needed=False, what=""), cache,
                                 chunk_size=chunk_size, impl=impl)
    nll = jnp.where(jnp.asarray(scored), nll[:, :t], jnp.nan)[:, : t - 1]
    return (nll, cache) if with_cache else nll


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "impl"))
def _stream_nll(graphdef, state, tokens, valid, targets, key, cache, *, chunk_size, impl):
    model = nnx.merge(graphdef, state)

    def next_token_nll(carry, hidden, val, tgt):
        logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
        return carry, -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]

    cache, _, nll = scan_chunks(model, tokens, valid, cache, key, next_token_nll, None, chunk_size=chunk_size, extras=(targets,), impl=impl)
    return jnp.moveaxis(nll, 0, 1).reshape(tokens.shape), cache


def perplexity(model: CachedDecoder, tokens, *, policy: Policy, mask=None, chunk_size: int = 128, start: int = 0,
               impl: str = "auto") -> float:
    """exp(mean NLL) of the tokens predicted from positions >= `start` (earlier ones are context only);
    ragged rows and masks as `stream_nll`."""
    nll = np.asarray(stream_nll(model, tokens, policy=policy, mask=mask, chunk_size=chunk_size, impl=impl))
    if not isinstance(start, int) or not 0 <= start < nll.shape[1]:
        raise ValueError(f"start={start!r} leaves nothing to score: use 0 <= start < {nll.shape[1]} (the text has {nll.shape[1] + 1} positions)")
    scored = nll[:, start:][np.isfinite(nll[:, start:])]
    if not scored.size:
        raise ValueError(f"no row has a token to predict after start={start}")
    return float(np.exp(scored.mean()))
