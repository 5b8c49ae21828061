"""Prefill + decode under one `jax.jit`, with the cache donated; or the same decode `block` tokens at a time.

The jitted functions' static arguments (model graph, sampler, sizes) are
frozen and hashable, so one compiled program serves every prompt in a length
bucket (padded up to a multiple of `chunk_size`) and every `max_new_tokens` in
a bucket (the next power of two, at least 128; the loop stops at the count
asked for). The policy travels in the cache's tree structure. Model parameters
travel as a pytree (`nnx.split` once, `nnx.merge` inside the trace), which
avoids `nnx.jit`'s per-call overhead.

A generation goes on from where it stands: `generate(..., cache=out.cache)`
appends a new turn to a compressed cache (a chat or an agent loop never
re-reads its history), and `stream` yields tokens as they are produced, from a
`DecodeState` that saves and restores with Orbax.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from kvjax.cache import KVCache
from kvjax.inputs import prng_key, token_batch
from kvjax.policies import resolve, stored_as
from kvjax.policies.base import Policy
from kvjax.protocol import CachedDecoder
from kvjax.run import forward_chunk, pad_to_chunks, prefill
from kvjax.sampling import Sampler
from kvjax.sharding import mesh_context, on_model_mesh

MIN_BUCKET = 128  # generated-token buffers are sized to the next power of two from here


@struct.dataclass
class GenerateOutput:
    """tokens: [B, max_new_tokens] (pad_id after a row stops); lengths: [B]
    tokens generated per row (a stop token included); cache: the final cache,
    holding the prompt and every generated token (pass it back to go on)."""

    tokens: Int[Array, "B N"]
    lengths: Int[Array, " B"]
    cache: KVCache


@struct.dataclass
class DecodeState:
    """Where a generation stands: the cache, the logits of the next token, the
    PRNG key and the rows that emitted a stop token. Everything a resumed
    generation needs; saves and restores with Orbax (`Stream.save`)."""

    cache: KVCache
    logits: Float[Array, "B V"]
    key: jax.Array
    done: Bool[Array, " B"]


def bucket(n: int) -> int:
    """The static size of a buffer for n generated tokens."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


class _Request:
    """A checked call: prompt ids and mask (chunk-padded), the cache it goes into (on the mesh of the
    model's weights, `state`), the key, the stops."""

    def __init__(self, model, state, prompt, *, policy, cache, max_new_tokens, prompt_lengths, prompt_mask, sampler,
                 stop_tokens, key, chunk_size, pad_id, kv_dtype=None):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        stops = (stop_tokens,) if isinstance(stop_tokens, (int, np.integer)) else tuple(stop_tokens)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in stops):
            raise TypeError(f"stop_tokens must be a token id or a tuple of ids, got {stop_tokens!r}")
        self.stop_tokens = tuple(int(t) for t in stops)
        self.key = prng_key(key, needed=sampler.temperature > 0, what=f"sampling with temperature={sampler.temperature}")
        ids, mask = token_batch(prompt, vocab_size=model.vocab_size, lengths=prompt_lengths, mask=prompt_mask,
                                name="prompt", lengths_name="prompt_lengths", mask_name="prompt_mask")
        self.cache = _cache_for(model, stored_as(policy, kv_dtype), cache, ids.shape[0], kv_dtype)
        seen = 0 if cache is None else int(np.asarray(cache.seen).max())
        for layer_policy in self.cache.policies:
            layer_policy.check_length(seen + int(mask.sum(-1).max()) + max_new_tokens,
                                      "tokens seen + prompt + max_new_tokens" if seen else "prompt + max_new_tokens")
        self.tokens, self.valid = pad_to_chunks(jnp.asarray(ids), jnp.asarray(mask), chunk_size, pad_id)
        self.cache, self.tokens, self.valid = on_model_mesh(state, self.cache, self.tokens, self.valid)


def _cache_for(model, policy, cache, batch: int, kv_dtype: str | None = None) -> KVCache:
    """A fresh cache for `policy`, or the given one (a new turn), checked against the policy, batch and format."""
    if cache is None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a kvjax Policy (see kvjax.policies.make), got {type(policy).__name__}")
        return model.cache_spec().init(policy, batch)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a kvjax.KVCache (e.g. out.cache of an earlier generate), got {type(cache).__name__}")
    if policy is not None and resolve(policy, model.cache_spec()) != cache.policies:
        raise ValueError("the cache was built for another policy; pass policy=None (or the same policy) to go on with it")
    if cache.batch != batch:
        raise ValueError(f"the cache holds {cache.batch} rows but the prompt has {batch}; give one new turn per row")
    stored = {p.kv_format.name if p.kv_format else None for p in cache.policies}
    if kv_dtype is not None and stored != {kv_dtype}:
        raise ValueError(f"the cache stores its slots as {sorted(map(str, stored))}, not {kv_dtype}: a cache keeps its format; "
                         "pass kv_dtype=None to go on with it, or start a new cache")
    return cache


def generate(
    model: CachedDecoder,
    prompt,
    *,
    policy: Policy | None = None,
    max_new_tokens: int,
    cache: KVCache | None = None,
    prompt_lengths=None,
    prompt_mask=None,
    sampler: Sampler = Sampler(),
    stop_tokens: int | tuple[int, ...] = (),
    key: jax.Array | int | None = None,
    chunk_size: int = 64,
    pad_id: int = 0,
    impl: str = "auto",
    kv_dtype: str | None = None,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row with a fixed-capacity cache.

    prompt: [B, P] int token ids, or a list of B rows of different lengths
    (padded here). Rows of an array may be padded on either side: give
    `prompt_lengths` [B] (right padding) or `prompt_mask` [B, P] (True = real
    token, any pattern). Padding never takes a slot, a position or attention.
    A row stops after emitting one of `stop_tokens` (an id or a tuple of ids).
    key: `jax.random.key(seed)` or an int seed; required when sampling (temperature > 0).
    cache: go on from an earlier call's `out.cache` (the prompt is the next
    turn; `policy` may be omitted). The cache is donated: use the new one.
    kv_dtype: store the slots as "int8", "fp8", "bfloat16" or "float32"
    (`kvjax.policies.Quantized`), for any policy.

    Returns `GenerateOutput`: `tokens` [B, max_new_tokens] the generated ids
    (`pad_id` after a row stopped), `lengths` [B] how many each row generated
    (its stop token included), `cache` the final cache.
    """
    graphdef, state = nnx.split(model)
    req = _Request(model, state, prompt, policy=policy, cache=cache, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths,
                   prompt_mask=prompt_mask, sampler=sampler, stop_tokens=stop_tokens, key=key, chunk_size=chunk_size, pad_id=pad_id,
                   kv_dtype=kv_dtype)
    with mesh_context(state):
        out = _generate(
            graphdef, state, req.tokens, req.valid, req.cache, req.key, jnp.int32(max_new_tokens),
            sampler=sampler, stop_tokens=req.stop_tokens, steps=bucket(max_new_tokens), chunk_size=chunk_size, pad_id=pad_id, impl=impl,
        )
    return out.replace(tokens=out.tokens[:, :max_new_tokens])


def _start(model, tokens, valid, cache, key, *, chunk_size, impl) -> DecodeState:
    """Prefill the prompt into the cache; the state before the first generated token."""
    key, prefill_key = jax.random.split(key)
    last, cache = prefill(model, tokens, valid, cache, prefill_key, chunk_size=chunk_size, impl=impl)
    return DecodeState(cache=cache, logits=model.logits(last).astype(jnp.float32), key=key, done=jnp.zeros(tokens.shape[:1], bool))


def _decode(model, st: DecodeState, limit, *, steps: int, sampler, stop_tokens, pad_id, impl):
    """Up to `limit` (<= steps) tokens per row: sample, feed back through the cache, until every row stopped.
    Returns (tokens [B, steps], lengths [B], the state after them)."""
    stops = jnp.asarray(stop_tokens, jnp.int32)
    b = st.done.shape[0]

    def body(carry):
        i, tokens, lengths, st = carry
        key, sample_key, step_key = jax.random.split(st.key, 3)
        tok = jnp.where(st.done, pad_id, sampler(st.logits, sample_key))
        hidden, cache = forward_chunk(model, tok[:, None], ~st.done[:, None], st.cache, step_key, prefill=False, impl=impl)
        st = DecodeState(cache=cache, logits=model.logits(hidden[:, 0]).astype(jnp.float32), key=key, done=st.done | jnp.isin(tok, stops))
        return i + 1, tokens.at[:, i].set(tok), lengths + ~carry[3].done, st

    def cond(carry):
        return (carry[0] < limit) & ~carry[3].done.all()

    init = (jnp.int32(0), jnp.full((b, steps), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32), st)
    _, tokens, lengths, st = jax.lax.while_loop(cond, body, init)
    return tokens, lengths, st


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "sampler", "stop_tokens", "steps", "chunk_size", "pad_id", "impl"),
    donate_argnames=("cache",),
)
def _generate(graphdef, state, tokens, valid, cache, key, limit, *, sampler, stop_tokens, steps, chunk_size, pad_id, impl):
    model = nnx.merge(graphdef, state)
    st = _start(model, tokens, valid, cache, key, chunk_size=chunk_size, impl=impl)
    out, lengths, st = _decode(model, st, limit, steps=steps, sampler=sampler, stop_tokens=stop_tokens, pad_id=pad_id, impl=impl)
    return GenerateOutput(tokens=out, lengths=lengths, cache=st.cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "impl"), donate_argnames=("cache",))
def _start_jit(graphdef, state, tokens, valid, cache, key, *, chunk_size, impl) -> DecodeState:
    return _start(nnx.merge(graphdef, state), tokens, valid, cache, key, chunk_size=chunk_size, impl=impl)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "stop_tokens", "steps", "pad_id", "impl"), donate_argnames=("st",))
def _decode_jit(graphdef, state, st, limit, *, sampler, stop_tokens, steps, pad_id, impl):
    return _decode(nnx.merge(graphdef, state), st, limit, steps=steps, sampler=sampler, stop_tokens=stop_tokens, pad_id=pad_id, impl=impl)


class Stream:
    """Tokens as they are produced: iterating yields [B, n] numpy blocks of at most `block` tokens
    (`pad_id` for rows that stopped), one compiled decode program for every block.

    `state` is where the generation stands; `save(path)` writes it with Orbax and
    `Stream.restore(path, model, policy, batch, ...)` goes on with the same tokens.
    """

    def __init__(self, model, state: DecodeState, *, max_new_tokens: int, produced: int = 0, block: int = 16,
                 sampler: Sampler = Sampler(), stop_tokens: tuple[int, ...] = (), pad_id: int = 0, impl: str = "auto"):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        self.model, self.state, self.max_new_tokens, self.produced = model, state, max_new_tokens, produced
        self.settings = dict(sampler=sampler, stop_tokens=stop_tokens, steps=block, pad_id=pad_id, impl=impl)

    def __iter__(self) -> Iterator[np.ndarray]:
        graphdef, params = nnx.split(self.model)
        while self.produced < self.max_new_tokens and not bool(np.asarray(self.state.done).all()):
            n = min(self.settings["steps"], self.max_new_tokens - self.produced)
            with mesh_context(params):
                tokens, _, self.state = _decode_jit(graphdef, params, self.state, jnp.int32(n), **self.settings)
            self.produced += n
            yield np.asarray(tokens[:, :n])

    def save(self, path) -> pathlib.Path:
        """Write the decode state (cache, policy state, logits, key) and the token count with Orbax."""
        import orbax.checkpoint as ocp

        path = pathlib.Path(path).absolute()
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, dict(leaves=_storable(self.state), produced=np.int32(self.produced)))
        return path

    @classmethod
    def restore(cls, path, model, policy: Policy, batch: int, *, max_new_tokens: int, **settings) -> Stream:
        """A stream saved by `save`, for the same model, policy and batch; `settings` as `stream`'s."""
        import orbax.checkpoint as ocp

        def fresh():
            cache = model.cache_spec().init(policy, batch)
            return DecodeState(cache=cache, logits=jnp.zeros((batch, model.vocab_size), jnp.float32),
                               key=jax.random.key(0), done=jnp.zeros((batch,), bool))

        template = jax.eval_shape(lambda: fresh().replace(key=jax.random.key_data(jax.random.key(0))))
        target = dict(leaves=_storable(template), produced=jax.ShapeDtypeStruct((), np.int32))
        with ocp.StandardCheckpointer() as ckpt:
            saved = ckpt.restore(pathlib.Path(path).absolute(), target)
        leaves, treedef = jax.tree.flatten(template)
        stored = iter(saved["leaves"])
        state = treedef.unflatten([next(stored) if x.size else jnp.zeros(x.shape, x.dtype) for x in leaves])
        state = state.replace(key=jax.random.wrap_key_data(state.key))
        return cls(model, state, max_new_tokens=max_new_tokens, produced=int(saved["produced"]), **settings)


def _storable(state: DecodeState) -> list:
    """What a checkpoint holds: the state's arrays in tree order, the PRNG key as raw data, without
    empty arrays (POD's non-owner layers hold no distant keys; Orbax refuses size 0)."""
    if not isinstance(state.key, jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key):
        state = state.replace(key=jax.random.key_data(state.key))
    return [x for x in jax.tree.leaves(state) if x.size]


def stream(
    model: CachedDecoder, prompt, *, policy: Policy | None = None, max_new_tokens: int, block: int = 16,
    cache: KVCache | None = None, prompt_lengths=None, prompt_mask=None, sampler: Sampler = Sampler(),
    stop_tokens: int | tuple[int, ...] = (), key: jax.Array | int | None = None, chunk_size: int = 64, pad_id: int = 0,
    impl: str = "auto", kv_dtype: str | None = None,
) -> Stream:
    """`generate`, yielding tokens `block` at a time as they are produced (the same tokens
    for the same key); arguments as `generate`'s."""
    graphdef, state = nnx.split(model)
    req = _Request(model, state, prompt, policy=policy, cache=cache, max_new_tokens=max_new_tokens, prompt_lengths=prompt_lengths,
                   prompt_mask=prompt_mask, sampler=sampler, stop_tokens=stop_tokens, key=key, chunk_size=chunk_size, pad_id=pad_id,
                   kv_dtype=kv_dtype)
    with mesh_context(state):
        start = _start_jit(graphdef, state, req.tokens, req.valid, req.cache, req.key, chunk_size=chunk_size, impl=impl)
    return Stream(model, start, max_new_tokens=max_new_tokens, block=block, sampler=sampler,
                  stop_tokens=req.stop_tokens, pad_id=pad_id, impl=impl)
