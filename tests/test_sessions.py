"""A generation that goes on: new turns on a compressed cache, tokens streamed in blocks,
a stream saved with Orbax and resumed, one compiled program for many token counts."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import kvjax
from models import Llama, LlamaConfig
from tests.helpers import compiles_of
from tests.test_policies import make_policy


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


def turn(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, size=(2, n))


def test_two_turns_through_the_cache_equal_one_call(model):
    """With `full` and room for everything, turn 2 on turn 1's cache generates what one call over
    (turn 1, its reply, turn 2) generates; a compressing policy stays within its capacity."""
    first, second = turn(0, 9), turn(1, 5)
    out1 = kvjax.generate(model, first, policy=kvjax.policies.make("full", capacity=64), max_new_tokens=6, chunk_size=4)
    out2 = kvjax.generate(model, second, cache=out1.cache, max_new_tokens=6, chunk_size=4)
    whole = np.concatenate([first, np.asarray(out1.tokens), second], 1)
    once = kvjax.generate(model, whole, policy=kvjax.policies.make("full", capacity=64), max_new_tokens=6, chunk_size=4)
    np.testing.assert_array_equal(out2.tokens, once.tokens)
    assert np.asarray(out2.cache.seen).tolist() == [9 + 6 + 5 + 6] * 2

    out = kvjax.generate(model, first, policy=kvjax.policies.make("h2o", capacity=8), max_new_tokens=4, chunk_size=4)
    for i in range(3):
        out = kvjax.generate(model, turn(10 + i, 7), cache=out.cache, max_new_tokens=4, chunk_size=4)
        assert int(out.cache.lengths().max()) == 8
    assert np.asarray(out.cache.seen).tolist() == [9 + 4 + 3 * (7 + 4)] * 2


def test_a_cache_refuses_another_policy_or_batch(model):
    out = kvjax.generate(model, turn(0, 5), policy=kvjax.policies.make("h2o", capacity=8), max_new_tokens=2)
    with pytest.raises(ValueError, match="built for another policy"):
        kvjax.generate(model, turn(1, 3), policy=kvjax.policies.make("tova", capacity=8), cache=out.cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="holds 2 rows but the prompt has 1"):
        kvjax.generate(model, turn(1, 3)[:1], cache=out.cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="never evicts but capacity=10 < tokens seen"):
        full = kvjax.generate(model, turn(0, 5), policy=kvjax.policies.make("full", capacity=10), max_new_tokens=2)
        kvjax.generate(model, turn(1, 3), cache=full.cache, max_new_tokens=2)


def test_one_compile_serves_many_token_counts(model):
    with compiles_of("jit(_generate)") as compiles:
        policy = kvjax.policies.make("h2o", capacity=10)  # a fresh static config for this test
        for n in (10, 50, 100):
            out = kvjax.generate(model, turn(3, 6), policy=policy, max_new_tokens=n, chunk_size=8)
            assert out.tokens.shape == (2, n) and np.asarray(out.lengths).tolist() == [n, n]
    assert len(compiles) == 1


def test_streamed_blocks_are_the_generated_tokens(model):
    policy = kvjax.policies.make("snapkv", capacity=12, window=4)
    sampler = kvjax.Sampler(temperature=1.0)
    whole = kvjax.generate(model, turn(4, 10), policy=policy, max_new_tokens=23, sampler=sampler, key=3, chunk_size=8)
    with compiles_of("jit(_decode_jit)") as compiles:
        blocks = list(kvjax.stream(model, turn(4, 10), policy=policy, max_new_tokens=23, block=5, sampler=sampler, key=3, chunk_size=8))
    assert [b.shape[1] for b in blocks] == [5, 5, 5, 5, 3] and len(compiles) == 1  # one program for every block
    np.testing.assert_array_equal(np.concatenate(blocks, 1), whole.tokens)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "kvmerger", "pod", "dmc"])
def test_a_saved_stream_resumes_the_same_generation(model, name, tmp_path):
    policy = make_policy(name, 10, layers=model.cfg.num_layers)
    whole = kvjax.generate(model, turn(5, 11), policy=policy, max_new_tokens=12, chunk_size=4)
    first = kvjax.stream(model, turn(5, 11), policy=policy, max_new_tokens=12, block=4, chunk_size=4)
    head = next(iter(first))
    first.save(tmp_path / "stream")
    resumed = kvjax.Stream.restore(tmp_path / "stream", model, policy, 2, max_new_tokens=12, block=4)
    np.testing.assert_array_equal(np.concatenate([head, *resumed], 1), whole.tokens)
