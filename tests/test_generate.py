"""The jitted generate loop on the tiny Llama: equality with the full cache,
padding, compilation count, donation, memory, sampling and stop tokens."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.generate import _generate
from kvjax.policies.pod import DistantCache
from kvjax.run import forward_chunk, scan_chunks
from models import Llama, LlamaConfig
from tests.helpers import decision_dimension_zeroed, prefill_memory
from tests.test_policies import POLICIES, make_policy


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


def prompt(seed, batch=1, length=24):
    return jax.random.randint(jax.random.key(seed), (batch, length), 1, 256)


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "chunk"))
def _all_logits(graphdef, state, tokens, *, policy, chunk):
    model = nnx.merge(graphdef, state)
    cache = model.cache_spec().init(policy, tokens.shape[0])
    logits_of = lambda carry, hidden, valid: (carry, model.logits(hidden))  # noqa: E731
    _, _, logits = scan_chunks(model, tokens, jnp.ones_like(tokens, bool), cache, jax.random.key(0), logits_of, None, chunk_size=chunk)
    return jnp.concatenate(list(logits), axis=1)


def all_logits(model, tokens, policy, chunk=8):
    graphdef, state = nnx.split(model)
    return np.asarray(_all_logits(graphdef, state, tokens, policy=policy, chunk=chunk))


@pytest.mark.parametrize("name", POLICIES)
def test_capacity_covering_the_sequence_equals_full(model, name):
    """Logits and greedy tokens equal the full cache's when nothing must be evicted."""
    tokens = prompt(0)
    policy = make_policy(name, 40, layers=2)
    if name == "pyramidkv":
        policy = kvjax.policies.make("pyramidkv", capacity=40, window=1, kernel=3, num_layers=2, beta=1.0)
    if name == "pod":  # blocks of size one (sharing keys is an approximation even with room for all)
        policy = kvjax.policies.make("pod", capacity=40, sinks=1, window=1)
    if name == "dmc":  # a model whose decision dimension is 0 never merges and loses nothing
        model = decision_dimension_zeroed(model)
    full = kvjax.policies.make("full", capacity=40)
    np.testing.assert_allclose(all_logits(model, tokens, policy), all_logits(model, tokens, full), atol=2e-5, rtol=1e-5)
    got = kvjax.generate(model, tokens, policy=policy, max_new_tokens=8, chunk_size=8)
    want = kvjax.generate(model, tokens, policy=full, max_new_tokens=8, chunk_size=8)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_compression_changes_the_logits(model):
    """The equality above has teeth: a cache smaller than the sequence differs."""
    tokens = prompt(0)
    small = all_logits(model, tokens, kvjax.policies.make("window", capacity=8))
    full = all_logits(model, tokens, kvjax.policies.make("full", capacity=24))
    np.testing.assert_allclose(small[:, :9], full[:, :9], atol=2e-5, rtol=1e-5)  # nothing evicted yet
    assert np.abs(small[:, 16:] - full[:, 16:]).max() > 1e-3


@pytest.mark.parametrize("name", ["h2o", "streaming_llm"])
def test_padding_takes_no_slot_and_no_attention(model, name):
    """A batch with left- and right-padded rows generates what each row alone does."""
    policy = make_policy(name, 8, rerotate=True)
    a, b = np.asarray(prompt(1, length=11))[0], np.asarray(prompt(2, length=16))[0]
    solo = [kvjax.generate(model, x[None], policy=policy, max_new_tokens=6, chunk_size=4) for x in (a, b)]
    left = np.stack([np.concatenate([np.zeros(5, int), a]), b])
    right = np.stack([np.concatenate([a, np.zeros(5, int)]), b])
    masks = {"left": left > -1, "right": right > -1}
    masks["left"][0, :5] = False
    masks["right"][0, 11:] = False
    for batch, mask in ((left, masks["left"]), (right, masks["right"])):
        out = kvjax.generate(model, batch, prompt_mask=mask, policy=policy, max_new_tokens=6, chunk_size=4)
        for row in range(2):
            np.testing.assert_array_equal(out.tokens[row], solo[row].tokens[0])
            assert int(out.cache.seen[row]) == int(solo[row].cache.seen[0])
            for got, want in zip(out.cache.layers, solo[row].cache.layers):
                np.testing.assert_array_equal(np.sort(got.pos[row], -1), np.sort(want.pos[0], -1))
    by_length = kvjax.generate(model, right, prompt_lengths=[11, 16], policy=policy, max_new_tokens=6, chunk_size=4)
    np.testing.assert_array_equal(by_length.tokens, out.tokens)


def test_one_compilation_per_length_bucket(model):
    """Several decode steps and prompts of different lengths in one bucket share
    one compiled program."""
    compiles, traces = [], []

    def listener(event, duration, **kw):
        if kw.get("fun_name") == "jit(_generate)" and event.endswith("backend_compile_duration"):
            compiles.append(kw)
        if kw.get("fun_name") == "_generate" and event.endswith("jaxpr_trace_duration"):
            traces.append(kw)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        policy = kvjax.policies.make("h2o", capacity=12)  # a fresh static config for this test
        for length in (9, 13, 16):  # one bucket of chunk_size 16
            out = kvjax.generate(model, prompt(length, length=length), policy=policy, max_new_tokens=7, chunk_size=16)
            assert int(out.lengths[0]) == 7
        assert len(compiles) == len(traces) == 1
        kvjax.generate(model, prompt(3, length=17), policy=policy, max_new_tokens=7, chunk_size=16)
        assert len(compiles) == len(traces) == 2  # the next bucket compiles once more
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_cache_buffers_are_donated(model):
    policy = kvjax.policies.make("window", capacity=8)
    cache = model.cache_spec().init(policy, 1)
    graphdef, state = nnx.split(model)
    tokens = prompt(4, length=8)
    _generate(
        graphdef, state, tokens, jnp.ones_like(tokens, bool), cache, jax.random.key(0), jnp.int32(3),
        sampler=kvjax.Sampler(), stop_tokens=(), steps=128, chunk_size=8, pad_id=0, impl="xla",
    )
    assert all(x.is_deleted() for x in jax.tree.leaves(cache))


IN_PLACE = ["full", "window", "streaming_llm", "h2o", "tova", "snapkv", "pyramidkv", "knorm", "kvmerger", "bct", "pod", "dmc"]
DEQUANTIZED = ("kvmerger", "bct", "pod", "dmc")  # under int8 slots they compute on a dequantized view


@pytest.mark.parametrize(("name", "kv_dtype"), [(n, None) for n in IN_PLACE] + [(n, "int8") for n in IN_PLACE if n not in DEQUANTIZED])
def test_compiled_decode_step_writes_the_cache_in_place(model, name, kv_dtype):
    """With the cache donated, the compiled decode step copies no K/V buffer (an HLO `copy` of a
    slot or ring buffer's shape, [1, kv_heads, slots, head_dim], would be one) and its outputs alias
    at least every K and V buffer: a step writes its slot where the cache lives, whatever decides
    the slot. So do int8 slots under the scorer tier (`Quantized` keeps them as stored)."""
    policy = make_policy(name, 96, layers=model.cfg.num_layers)  # POD: layer 1 reads layer 0's distant keys
    cache = model.cache_spec().init(kvjax.policies.Quantized(policy, kv_dtype) if kv_dtype else policy, 1)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, c, t: forward_chunk(nnx.merge(graphdef, st), t, t > 0, c, jax.random.key(0), prefill=False),
                   donate_argnums=1)
    compiled = step.lower(state, cache, jnp.ones((1, 1), jnp.int32)).compile()
    rings = [st for st in cache.state if isinstance(st, DistantCache)]
    buffers = [x for part in (*cache.layers, *rings) for x in (part.k, part.v) if x.size]  # a non-owner's ring has no keys
    shapes = {"[" + ",".join(map(str, x.shape)) + "]" for x in buffers}
    copies = [line for line in compiled.as_text().splitlines() if " copy(" in line and any(s in line.split(" copy(")[0] for s in shapes)]
    assert not copies, copies[:2]
    assert compiled.memory_analysis().alias_size_in_bytes >= sum(x.nbytes for x in buffers)


@pytest.mark.parametrize("name", ["full", "h2o", "kvmerger", "bct", "pod", "dmc"])
def test_decode_step_scratch_memory_does_not_grow_by_a_cache_per_layer(name):
    """Per-layer work on the cache alone (POD's join of slots and ring, KVMerger's keys in position
    order, BCT's key norms) must run layer by layer, not be hoisted to the step's start with every
    layer's copy alive at once: from 2 to 6 layers the compiled step's scratch memory grows by less
    than a quarter of a layer's K/V bytes per layer (hoisted, it grew by 56-100%)."""
    temp, layer_bytes = [], 0
    for layers in (2, 6):
        model = Llama(LlamaConfig.tiny(num_layers=layers), rngs=nnx.Rngs(0))
        cache = model.cache_spec().init(make_policy(name, 256), 4)
        graphdef, state = nnx.split(model)
        step = jax.jit(lambda st, c, t: forward_chunk(nnx.merge(graphdef, st), t, t > 0, c, jax.random.key(0), prefill=False),
                       donate_argnums=1)
        temp.append(step.lower(state, cache, jnp.ones((4, 1), jnp.int32)).compile().memory_analysis().temp_size_in_bytes)
        rings = [st for st in cache.state[:1] if isinstance(st, DistantCache)]
        layer_bytes = sum(x.nbytes for part in (cache.layers[0], *rings) for x in (part.k, part.v))
    assert (temp[1] - temp[0]) / 4 < layer_bytes / 4, (temp, layer_bytes)


@pytest.mark.parametrize("name", ["h2o", "kvmerger", "pod", "dmc"])
def test_decode_steps_trace_once(model, name):
    """A jitted decode step is traced once while its cache fills up and starts evicting."""
    graphdef, state = nnx.split(model)
    cache = model.cache_spec().init(kvjax.policies.make(name, capacity=6, **({"sinks": 1, "window": 2} if name == "pod" else {})), 1)
    chex.clear_trace_counter()  # the counter is per function definition, shared by the parameters

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, cache, token, key):
        return forward_chunk(nnx.merge(graphdef, state), token, jnp.ones_like(token, bool), cache, key, prefill=False)

    for i in range(10):
        _, cache = step(state, cache, jnp.full((1, 1), i + 1, jnp.int32), jax.random.key(i))
    assert int(cache.seen[0]) == 10 and int(cache.lengths().max()) <= 6


def test_prefill_memory_does_not_grow_with_the_prompt(model):
    """Chunked prefill: the compiled program's scratch memory is independent of
    the prompt length apart from the token ids and mask themselves (5 B/token)."""
    policy = kvjax.policies.make("h2o", capacity=32)
    (small, _), (large, _) = prefill_memory(model, policy, (64, 4096), chunk=16)[0]
    activations_per_token = 4 * model.cfg.hidden_size  # what an O(length) prefill would hold at least
    assert large - small <= 5 * (4096 - 64)
    assert large - small < activations_per_token * (4096 - 64) / 10


def test_stop_tokens_end_a_row(model):
    tokens = prompt(5, batch=2)
    policy = kvjax.policies.make("window", capacity=16)
    free = kvjax.generate(model, tokens, policy=policy, max_new_tokens=8, chunk_size=8)
    stop = int(free.tokens[0, 2])
    first = int(np.flatnonzero(np.asarray(free.tokens[0]) == stop)[0])
    out = kvjax.generate(model, tokens, policy=policy, max_new_tokens=8, chunk_size=8, stop_tokens=(stop,), pad_id=-1)
    assert int(out.lengths[0]) == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert (np.asarray(out.tokens[0, first + 1 :]) == -1).all()
    hits = np.flatnonzero(np.asarray(free.tokens[1]) == stop)
    assert int(out.lengths[1]) == (hits[0] + 1 if hits.size else 8)


def test_sampling(model):
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    greedy = kvjax.Sampler()(logits, jax.random.key(1))
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    np.testing.assert_array_equal(kvjax.Sampler(temperature=1.0, top_k=1)(logits, jax.random.key(1)), greedy)
    np.testing.assert_array_equal(kvjax.Sampler(temperature=1.0, top_p=1e-6)(logits, jax.random.key(1)), greedy)
    keys = jax.random.split(jax.random.key(2), 300)
    draws = np.asarray(jax.vmap(lambda k: kvjax.Sampler(temperature=1.0, top_k=3)(logits, k))(keys))
    top3 = np.argsort(np.asarray(logits), -1)[:, -3:]
    assert all(set(draws[:, row]) <= set(top3[row]) for row in range(4))
    assert all(len(set(draws[:, row])) > 1 for row in range(4))
    # top-p keeps the smallest set of most likely tokens whose mass reaches p.
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)
    nucleus = set(order[: np.searchsorted(np.cumsum(probs[order]), 0.6) + 1])
    draws = np.asarray(jax.vmap(lambda k: kvjax.Sampler(temperature=1.0, top_p=0.6)(logits[:1], k))(keys))[:, 0]
    assert set(draws) == nucleus
    a = kvjax.generate(model, prompt(6), policy=kvjax.policies.make("window", capacity=8), max_new_tokens=5,
                       sampler=kvjax.Sampler(temperature=1.0), key=jax.random.key(7), chunk_size=8)
    b = kvjax.generate(model, prompt(6), policy=kvjax.policies.make("window", capacity=8), max_new_tokens=5,
                       sampler=kvjax.Sampler(temperature=1.0), key=jax.random.key(7), chunk_size=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
