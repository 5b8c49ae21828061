"""Inputs that used to give a silently wrong result now raise, and inputs users pass just work:
ragged batches, int seeds, a bare stop token, empty checkpoint folders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax.calibrate import merge_profile
from kvjax.evaluate import perplexity, stream_nll
from models import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


H2O = kvjax.policies.make("h2o", capacity=8)


@pytest.mark.parametrize("bad, where", [(256, "row 1, position 2"), (-1, "row 1, position 2")])
def test_token_ids_outside_the_vocabulary_are_named(model, bad, where):
    ids = np.ones((2, 6), np.int32)
    ids[1, 2] = bad
    message = f"token id {bad} at {where} is outside the model's vocabulary \\[0, 256\\)"
    with pytest.raises(ValueError, match=message):
        kvjax.generate(model, ids, policy=H2O, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        stream_nll(model, ids, policy=H2O)
    with pytest.raises(ValueError, match=message):
        perplexity(model, ids, policy=H2O)
    with pytest.raises(ValueError, match=message):
        merge_profile(model, ids)
    cache = model.cache_spec().init(H2O, 2)
    with pytest.raises(ValueError, match=message):
        kvjax.prefill(model, jnp.asarray(ids), jnp.ones(ids.shape, bool), cache, jax.random.key(0), chunk_size=6)
    # padding that is masked out may hold anything
    out = kvjax.generate(model, ids, prompt_mask=ids >= 0, policy=H2O, max_new_tokens=2) if bad < 0 else None
    assert out is None or out.tokens.shape == (2, 2)


def test_full_cache_below_the_text_length_raises_in_evaluate(model):
    text = np.arange(40)[None] % 256
    with pytest.raises(ValueError, match="never evicts but capacity=8 < the text's length = 40"):
        perplexity(model, text, policy=kvjax.policies.make("full", capacity=8))


def test_perplexity_start_must_leave_tokens(model):
    text = np.arange(20)[None]
    with pytest.raises(ValueError, match="start=19 leaves nothing to score"):
        perplexity(model, text, policy=H2O, start=19)
    assert np.isfinite(perplexity(model, text, policy=H2O, start=18))


def test_a_plan_is_for_its_batch(model):
    plan = kvjax.plan_capacity(model.cfg, "256KiB", policy="h2o", batch=1)
    with pytest.raises(ValueError, match=r"planned for batch=1 .* batch=3 would take 3x .*plan_capacity\(..., batch=3\)"):
        kvjax.generate(model, np.ones((3, 4), np.int32), policy=plan.policy(), max_new_tokens=2)
    out = kvjax.generate(model, np.ones((1, 4), np.int32), policy=plan.policy(), max_new_tokens=2)
    assert out.cache.nbytes == plan.nbytes


def test_ragged_rows_equal_each_row_alone(model):
    rows = [np.arange(1, 8), np.arange(20, 24), np.arange(50, 61)]
    out = kvjax.generate(model, rows, policy=H2O, max_new_tokens=5, chunk_size=4)
    nll = np.asarray(stream_nll(model, rows, policy=H2O, chunk_size=4))
    for i, row in enumerate(rows):
        alone = kvjax.generate(model, [row], policy=H2O, max_new_tokens=5, chunk_size=4)
        np.testing.assert_array_equal(out.tokens[i], alone.tokens[0])
        row_nll = np.asarray(stream_nll(model, row[None], policy=H2O, chunk_size=4))[0]
        np.testing.assert_allclose(nll[i, : len(row) - 1], row_nll, rtol=1e-5, atol=1e-6)
        assert np.isnan(nll[i, len(row) - 1 :]).all()  # no next token there
    ppl = perplexity(model, rows, policy=H2O, chunk_size=4)
    assert np.isclose(np.log(ppl), np.nanmean(nll), rtol=1e-6)


@pytest.mark.parametrize("rows", [[[]], [[1, 2], []]])
def test_empty_rows_say_so(model, rows):
    with pytest.raises(ValueError, match="have no valid token"):
        kvjax.generate(model, rows, policy=H2O, max_new_tokens=2)


def test_sampling_needs_an_explicit_key(model):
    sampler = kvjax.Sampler(temperature=0.8)
    with pytest.raises(ValueError, match=r"pass key=jax.random.key\(0\)"):
        kvjax.generate(model, [[1, 2, 3]], policy=H2O, max_new_tokens=3, sampler=sampler)
    seeded = kvjax.generate(model, [[1, 2, 3]], policy=H2O, max_new_tokens=3, sampler=sampler, key=7)
    keyed = kvjax.generate(model, [[1, 2, 3]], policy=H2O, max_new_tokens=3, sampler=sampler, key=jax.random.key(7))
    np.testing.assert_array_equal(seeded.tokens, keyed.tokens)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        kvjax.Sampler(temperature=float("inf"))


def test_a_bare_stop_token_is_accepted(model):
    first = int(kvjax.generate(model, [[5, 6, 7]], policy=H2O, max_new_tokens=1).tokens[0, 0])
    out = kvjax.generate(model, [[5, 6, 7]], policy=H2O, max_new_tokens=6, stop_tokens=first)
    assert int(out.lengths[0]) == 1
    with pytest.raises(TypeError, match="stop_tokens must be a token id or a tuple of ids"):
        kvjax.generate(model, [[5, 6, 7]], policy=H2O, max_new_tokens=6, stop_tokens="eos")


def test_save_into_an_empty_folder_and_load_nothing(model, tmp_path):
    (tmp_path / "ckpt").mkdir()
    models.save(model, tmp_path / "ckpt")
    restored = models.restore(tmp_path / "ckpt")
    np.testing.assert_array_equal(restored.embed_tokens.embedding[...], model.embed_tokens.embedding[...])
    with pytest.raises(ValueError, match="models.load needs a model: a name"):
        models.load("")
