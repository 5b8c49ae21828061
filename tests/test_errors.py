"""Bad input gives the documented exception with a message naming the problem and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxtyping import TypeCheckError

import kvjax
from kvjax.run import make_step
from models import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError, match="unknown policy 'h20'.*h2o.*snapkv"):
        kvjax.policies.make("h20", capacity=8)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"'tova' takes no option\(s\) \['recent'\]"):
        kvjax.policies.make("tova", capacity=8, recent=4)


@pytest.mark.parametrize(
    "name, options, minimum",
    [
        ("streaming_llm", dict(sinks=4, window=8), 12),
        ("streaming_llm", dict(sinks=6), 6),
        ("h2o", dict(window=10), 10),
        ("snapkv", dict(), 64),
        ("snapkv", dict(window=6, sinks=2), 8),
        ("pyramidkv", dict(window=9, num_layers=4), 9),
    ],
)
def test_capacity_below_protected_tokens_states_the_minimum(name, options, minimum):
    with pytest.raises(ValueError, match=f"capacity >= {minimum}"):
        kvjax.policies.make(name, capacity=minimum - 1, **options)
    kvjax.policies.make(name, capacity=minimum, **options)  # the minimum itself is fine


@pytest.mark.parametrize("capacity", [0, -3, 2.5, "8"])
def test_capacity_must_be_a_positive_int(capacity):
    with pytest.raises(ValueError, match="capacity must be an int"):
        kvjax.policies.make("window", capacity=capacity)


def test_policy_specific_options_are_checked():
    with pytest.raises(ValueError, match="num_layers must be the model's layer count"):
        kvjax.policies.make("pyramidkv", capacity=64, window=2, num_layers=-1)
    with pytest.raises(ValueError, match="kernel must be an odd"):
        kvjax.policies.make("snapkv", capacity=64, window=4, kernel=4)
    with pytest.raises(ValueError, match="made for num_layers=3"):
        kvjax.CacheSpec(num_layers=2, kv_heads=1, head_dim=8).init(kvjax.policies.make("pyramidkv", capacity=64, window=2, num_layers=3), 1)


def test_generate_rejects_bad_prompts(model):
    policy = kvjax.policies.make("window", capacity=8)
    with pytest.raises(TypeError, match="integer token ids"):
        kvjax.generate(model, jnp.ones((1, 4)), policy=policy, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        kvjax.generate(model, jnp.ones((4,), int), policy=policy, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_lengths must be 2 ints"):
        kvjax.generate(model, jnp.ones((2, 4), int), prompt_lengths=[3], policy=policy, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 4\]"):
        kvjax.generate(model, jnp.ones((2, 4), int), prompt_lengths=[3, 5], policy=policy, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt rows \[1\] have no valid token"):
        kvjax.generate(model, jnp.ones((2, 4), int), prompt_lengths=[3, 0], policy=policy, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_mask must be a bool array of shape"):
        kvjax.generate(model, jnp.ones((2, 4), int), prompt_mask=np.ones((2, 3), bool), policy=policy, max_new_tokens=2)
    with pytest.raises(ValueError, match="not both"):
        kvjax.generate(model, jnp.ones((2, 4), int), prompt_mask=np.ones((2, 4), bool), prompt_lengths=[1, 1], policy=policy, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        kvjax.generate(model, jnp.ones((1, 4), int), policy=policy, max_new_tokens=0)
    with pytest.raises(TypeError, match="kvjax.policies.make"):
        kvjax.generate(model, jnp.ones((1, 4), int), policy="h2o", max_new_tokens=2)


def test_full_cache_refuses_to_overflow(model):
    with pytest.raises(ValueError, match="never evicts but capacity=8 < prompt \\+ max_new_tokens = 10"):
        kvjax.generate(model, jnp.ones((1, 6), int), policy=kvjax.policies.make("full", capacity=8), max_new_tokens=4)


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        kvjax.Sampler(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        kvjax.Sampler(temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        kvjax.Sampler(temperature=1.0, top_p=1.5)


def _attend_inputs(batch=1, chunk=2, q_heads=4, kv_heads=2, dim=8, dtype=jnp.float32):
    spec = kvjax.CacheSpec(num_layers=1, kv_heads=kv_heads, head_dim=dim, dtype=jnp.dtype(dtype).name)
    cache = spec.init(kvjax.policies.make("window", capacity=4), batch)
    step = make_step(cache, jnp.ones((batch, chunk), bool), jax.random.key(0), prefill=True)
    q = jnp.zeros((batch, chunk, q_heads, dim), dtype)
    kv = jnp.zeros((batch, chunk, kv_heads, dim), dtype)
    return cache, step, q, kv


def test_attend_checks_shapes_and_dtypes():
    kwargs = dict(rope=kvjax.Rope(), scale=1.0)
    cache, step, q, kv = _attend_inputs()
    bare = kvjax.init_cache(slots=4, num_layers=1, batch=1, kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"no policy; build it with CacheSpec.init\(policy, batch\)"):
        kvjax.attend(bare, 0, q, kv, kv, step=step, **kwargs)
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 3, 8\), expected \[batch, chunk, kv_heads, head_dim\]"):
        kvjax.attend(cache, 0, q, jnp.zeros((1, 2, 3, 8)), kv, step=step, **kwargs)
    with pytest.raises(ValueError, match="q has shape"):
        kvjax.attend(cache, 0, jnp.zeros((1, 2, 3, 8)), kv, kv, step=step, **kwargs)
    with pytest.raises(ValueError, match="layer=1 is out of range"):
        kvjax.attend(cache, 1, q, kv, kv, step=step, **kwargs)
    with pytest.raises(TypeError, match="differs from the cache dtype"):
        kvjax.attend(cache, 0, q, kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), step=step, **kwargs)


def test_attention_checks_shapes_with_jaxtyping():
    cache, step, q, kv = _attend_inputs()
    lc = cache.layers[0]
    with pytest.raises(TypeCheckError, match="k_new"):
        kvjax.attention(q, lc.k, lc.v, lc.valid, jnp.zeros((1, 3, 2, 8)), kv, step.new_valid, scale=1.0)


def test_attention_impl_switch():
    cache, step, q, kv = _attend_inputs()
    lc = cache.layers[0]
    args = (q, lc.k, lc.v, lc.valid, kv, kv, step.new_valid)
    with pytest.raises(ValueError, match="impl must be one of"):
        kvjax.attention(*args, scale=1.0, impl="cuda")
    auto, _ = kvjax.attention(*args, scale=1.0, impl="auto")  # CPU: auto is XLA
    xla, _ = kvjax.attention(*args, scale=1.0, impl="xla")
    np.testing.assert_array_equal(auto, xla)
    pallas, _ = kvjax.attention(*args, scale=1.0, impl="pallas")  # interpreted on CPU
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-6)


def test_init_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="slots must be a positive int"):
        kvjax.init_cache(slots=0, num_layers=1, batch=1, kv_heads=1, head_dim=8)
