"""The public API under generated input: every call returns finite results within capacity,
or raises one of the documented exceptions (ValueError, TypeError) - never a JAX internal
error, a silent NaN or an overflowing cache."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from hypothesis import event, given, settings
from hypothesis import strategies as st

import kvjax
from models import Llama, LlamaConfig

MODEL = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
DOCUMENTED = (ValueError, TypeError)

ids = st.one_of(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(-2, 260))  # mostly valid
rows = st.lists(st.lists(ids, min_size=0, max_size=12), min_size=1, max_size=3)
sizes = st.one_of(st.integers(1, 16), st.integers(-1, 16))
policies = st.sampled_from(["h2o", "streaming_llm", "tova", "kvmerger", "bct", "full", "window"])  # defaults fit 16 slots


def call(fn):
    try:
        out = fn()
    except DOCUMENTED as err:
        assert str(err), "an error must say what is wrong"
        event(f"refused: {type(err).__name__}")
        return None
    event("ran")
    return out


@settings(max_examples=25)
@given(prompt=rows, name=policies, capacity=sizes, chunk=sizes, new=st.one_of(st.integers(1, 6), st.integers(0, 6)),
       temperature=st.sampled_from([0.0, 0.7, float("nan")]), seed=st.one_of(st.none(), st.integers(0, 9)))
def test_generate_returns_finite_tokens_within_capacity_or_a_documented_error(prompt, name, capacity, chunk, new, temperature, seed):
    def run():
        policy = kvjax.policies.make(name, capacity=capacity)
        return kvjax.generate(MODEL, prompt, policy=policy, max_new_tokens=new, chunk_size=chunk,
                              sampler=kvjax.Sampler(temperature=temperature), key=seed)

    out = call(run)
    if out is not None:
        tokens = np.asarray(out.tokens)
        assert tokens.shape == (len(prompt), new) and ((tokens >= 0) & (tokens < 256)).all()
        assert int(out.cache.lengths().max()) <= capacity


@settings(max_examples=25)
@given(text=st.lists(st.lists(ids, min_size=2, max_size=12), min_size=1, max_size=3), name=policies,
       capacity=st.integers(1, 16), chunk=st.integers(1, 8))
def test_perplexity_is_finite_or_a_documented_error(text, name, capacity, chunk):
    ppl = call(lambda: kvjax.evaluate.perplexity(MODEL, text, policy=kvjax.policies.make(name, capacity=capacity), chunk_size=chunk))
    assert ppl is None or (np.isfinite(ppl) and ppl > 0)


@pytest.mark.parametrize("bad", [np.float32(1.5), "abc", [[1.5, 2.0]], np.zeros((2, 2, 2), np.int32)])
def test_prompts_of_the_wrong_kind_are_documented_errors(bad):
    with pytest.raises(DOCUMENTED):
        kvjax.generate(MODEL, bad, policy=kvjax.policies.make("h2o", capacity=8), max_new_tokens=2)
