"""Task-independent evaluation: streaming perplexity, and answers to questions about a context.

Perplexity: the text is fed in chunks (`lax.scan`) through the fixed-capacity
cache, and each chunk's logits are reduced to the negative log-likelihood of
the next token before the next chunk, so memory is O(capacity + chunk x vocab).

Answers (`answer`) come by one of two protocols, named in every result:
- "kvpress": the context is prefilled as one chunk with full attention among
  its tokens, so the policy compresses it once, at its end, with the whole
  context in view; then the question and the answer are appended uncompressed.
  Query-agnostic, and what kvpress's leaderboard measures.
- "streaming": the whole prompt, question included, streams through the
  fixed-capacity cache chunk by chunk: memory is bounded from the first token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from kvjax.cache import KVCache
from kvjax.generate import GenerateOutput, generate
from kvjax.inputs import prng_key, token_batch
from kvjax.policies import stored_as
from kvjax.policies.base import Policy
from kvjax.protocol import CachedDecoder
from kvjax.run import pad_to_chunks, prefill, scan_chunks
from kvjax.sharding import mesh_context, on_model_mesh


def stream_nll(
    model: CachedDecoder, tokens, *, policy: Policy, mask=None, chunk_size: int = 128, key: jax.Array | int | None = None,
    with_cache: bool = False, impl: str = "auto", kv_dtype: str | None = None,
) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], KVCache]:
    """Per-token NLL in nats, [B, T-1]: entry j scores the row's next real token after position j,
    given every real token up to j (for a full rectangular batch: tokens[:, j + 1] given tokens[:, :j + 1]).

    tokens: [B, T] ids or a list of rows of different lengths; `mask` [B, T] marks
    real tokens of an array (any padding). Entries with no next token are NaN.
    Returns the final cache too with `with_cache`. `impl` picks attention ("auto":
    Pallas kernels on GPU/TPU, XLA on CPU; or "xla", "pallas"); `kv_dtype` stores
    the slots in that format (`kvjax.policies.stored_as`).
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
    cache = model.cache_spec().init(stored_as(policy, kv_dtype), b)
    for layer_policy in cache.policies:
        layer_policy.check_length(int(real.sum(-1).max()), what="the text's length")
    padded, valid = pad_to_chunks(jnp.asarray(ids), jnp.asarray(real), chunk_size)
    targets, _ = pad_to_chunks(jnp.asarray(targets), valid[:, :t], chunk_size)
    graphdef, state = nnx.split(model)
    cache, padded, valid, targets = on_model_mesh(state, cache, padded, valid, targets)
    with mesh_context(state):
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
               impl: str = "auto", kv_dtype: str | None = None) -> float:
    """exp(mean NLL) of the tokens predicted from positions >= `start` (earlier ones are context only);
    ragged rows, masks and `kv_dtype` as `stream_nll`."""
    nll = np.asarray(stream_nll(model, tokens, policy=policy, mask=mask, chunk_size=chunk_size, impl=impl, kv_dtype=kv_dtype))
    if not isinstance(start, int) or not 0 <= start < nll.shape[1]:
        raise ValueError(f"start={start!r} leaves nothing to score: use 0 <= start < {nll.shape[1]} (the text has {nll.shape[1] + 1} positions)")
    scored = nll[:, start:][np.isfinite(nll[:, start:])]
    if not scored.size:
        raise ValueError(f"no row has a token to predict after start={start}")
    return float(np.exp(scored.mean()))


PROTOCOLS = ("kvpress", "streaming")


def answer(
    model: CachedDecoder, context, question, *, policy: Policy, protocol: str, max_new_tokens: int,
    stop_tokens: int | tuple[int, ...] = (), chunk_size: int = 128, impl: str = "auto", kv_dtype: str | None = None,
) -> GenerateOutput:
    """Greedy answers to `question` after `context` ([B, *] ids or lists of ragged rows, one question per
    context), under `protocol` (see the module docstring).

    "kvpress": `policy`'s slots hold the compressed context; the cache then gains room for the longest
    question and `max_new_tokens` (`KVCache.with_room`), so it ends with capacity + question + answer
    slots, as kvpress's does. "streaming": `policy`'s slots are all there ever is; `chunk_size` is the
    prompt's chunk. `kv_dtype` stores the slots in that format. Returns `generate`'s output.
    """
    policy = stored_as(policy, kv_dtype)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ctx, ctx_real = token_batch(context, vocab_size=model.vocab_size, name="context")
    qst, qst_real = token_batch(question, vocab_size=model.vocab_size, name="question")
    if ctx.shape[0] != qst.shape[0]:
        raise ValueError(f"{ctx.shape[0]} contexts but {qst.shape[0]} questions: give one question per context")
    if protocol == "streaming":
        rows = [np.concatenate([c[m], q[r]]).tolist() for c, m, q, r in zip(ctx, ctx_real, qst, qst_real)]
        return generate(model, rows, policy=policy, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                        chunk_size=chunk_size, impl=impl)
    cache = model.cache_spec().init(policy, ctx.shape[0])
    for layer_policy in cache.policies:
        layer_policy.check_length(int(ctx_real.sum(-1).max()), what="the context")
    graphdef, state = nnx.split(model)
    cache, tokens, valid = on_model_mesh(state, cache, jnp.asarray(ctx), jnp.asarray(ctx_real))
    with mesh_context(state):
        cache = _compress_once(graphdef, state, tokens, valid, cache, jax.random.key(0), impl=impl)
    cache = cache.with_room(int(qst_real.sum(-1).max()) + max_new_tokens)
    return generate(model, [q[r].tolist() for q, r in zip(qst, qst_real)], cache=cache, max_new_tokens=max_new_tokens,
                    stop_tokens=stop_tokens, chunk_size=chunk_size, impl=impl)


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"), donate_argnames=("cache",))
def _compress_once(graphdef, state, tokens, valid, cache, key, *, impl):
    """The whole context as one prefill chunk: every token attends to every earlier one, then the policy compresses."""
    _, cache = prefill(nnx.merge(graphdef, state), tokens, valid, cache, key, chunk_size=tokens.shape[1], impl=impl)
    return cache
