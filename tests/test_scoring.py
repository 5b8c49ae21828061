"""Each policy's selection against a float64 numpy implementation of its paper's formula
(H2O, TOVA, SnapKV, PyramidKV, KNorm, StreamingLLM; papers cited in each policy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.policies import pyramid_budgets
from tests.helpers import full_attention, np_rope, np_softmax, random_qkv, run_layers, snapkv_keep, stream_by_score


def kept_sets(cache, layer=0, b=0):
    lc = cache.layers[layer]
    pos, valid = np.asarray(lc.pos[b]), np.asarray(lc.valid[b])
    return [sorted(p[v].tolist()) for p, v in zip(pos, valid)]


def kept_scores(cache, layer=0, b=0):
    lc = cache.layers[layer]
    pos, valid, score = (np.asarray(x[b]) for x in (lc.pos, lc.valid, lc.score))
    return [dict(zip(p[v].tolist(), s[v].tolist())) for p, v, s in zip(pos, valid, score)]


def run(policy, q, k, v, chunk):
    valid = jnp.ones(q.shape[1:3], bool)
    return run_layers(policy, q, k, v, valid, jax.random.key(0), chunk=chunk)


def test_h2o_accumulated_attention_matches_reference():
    q, k, v = random_qkv(1, length=20, q_heads=4, kv_heads=2)
    policy = kvjax.policies.make("h2o", capacity=6, window=2)
    _, cache, _ = run(policy, q, k, v, chunk=1)
    kept, scores = stream_by_score(q[0, 0], k[0, 0], v[0, 0], 6, window=2, score_fn=lambda p: p.sum(0), accumulate=True)
    assert kept_sets(cache) == kept
    for got, want in zip(kept_scores(cache), scores):
        np.testing.assert_allclose([got[j] for j in sorted(want)], [want[j] for j in sorted(want)], rtol=1e-5)


def test_h2o_scores_sum_to_queries_times_group():
    """every attention row sums to one, so with nothing evicted the
    accumulated scores of a KV head sum to (queries processed) x (group size)."""
    q, k, v = random_qkv(2, length=12, q_heads=6, kv_heads=2)
    _, cache, _ = run(kvjax.policies.make("h2o", capacity=16), q, k, v, chunk=4)
    np.testing.assert_allclose(np.asarray(cache.layers[0].score[0]).sum(-1), 12 * 3, rtol=1e-5)


def test_h2o_without_heavy_hitters_is_a_sliding_window():
    """With window = capacity, H2O keeps exactly the most recent tokens."""
    q, k, v = random_qkv(3, length=20)
    _, h2o, _ = run(kvjax.policies.make("h2o", capacity=5, window=5), q, k, v, chunk=1)
    _, win, _ = run(kvjax.policies.make("window", capacity=5), q, k, v, chunk=1)
    assert kept_sets(h2o) == kept_sets(win) == [list(range(15, 20))] * 2


def test_tova_head_average_matches_reference():
    """one eviction per step, the lowest head-averaged attention of
    the current query; every head of the layer keeps the same tokens."""
    q, k, v = random_qkv(4, length=18, q_heads=4, kv_heads=2)
    _, cache, _ = run(kvjax.policies.make("tova", capacity=5), q, k, v, chunk=1)
    kept, _ = stream_by_score(
        q[0, 0], k[0, 0], v[0, 0], 5, window=1, score_fn=lambda p: p.mean(0), accumulate=False, share_heads=True
    )
    assert kept_sets(cache) == kept
    assert kept[0] == kept[1]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_snapkv_pooled_votes_match_reference(kv_heads):
    """Whole prompt in one chunk: SnapKV's kept set, per head."""
    q, k, v = random_qkv(5 + kv_heads, length=24, q_heads=4, kv_heads=kv_heads)
    policy = kvjax.policies.make("snapkv", capacity=9, window=3, kernel=5)
    _, cache, _ = run(policy, q, k, v, chunk=24)
    assert kept_sets(cache) == snapkv_keep(q[0, 0], k[0, 0], 9, 3, 5)


def test_pyramidkv_budgets_follow_the_formula():
    """budgets non-increasing with depth, mean = the uniform budget."""
    for capacity, window, layers, beta in [(256, 8, 12, 20.0), (100, 4, 7, 5.0), (64, 2, 2, 2.0)]:
        lo = capacity / beta
        hi = 2 * capacity - lo
        want = [round(hi - layer * (hi - lo) / (layers - 1)) for layer in range(layers)]
        got = pyramid_budgets(capacity, window, layers, beta)
        assert list(got) == want
        assert all(a >= b for a, b in zip(got, got[1:]))
        assert abs(np.mean(got) - capacity) <= 0.5
    with pytest.warns(UserWarning, match=r"cannot hold the observation window \(32\); using uniform budgets of 64"):
        flat = pyramid_budgets(64, 32, 4, 20.0)
    assert flat == (64,) * 4  # lo = 3.2 < window: the fallback, said aloud
    assert len(set(pyramid_budgets(64, 2, 4, 1.0))) == 1  # beta = 1: uniform


def test_pyramidkv_keeps_each_layers_budget():
    layers = 3
    policy = kvjax.policies.make("pyramidkv", capacity=8, window=2, kernel=3, num_layers=layers, beta=2.0)
    q, k, v = random_qkv(6, layers=layers, length=24)
    _, cache, _ = run(policy, q, k, v, chunk=8)
    assert np.asarray(cache.lengths())[:, 0, 0].tolist() == list(policy.budgets(layers)) == [12, 8, 4]
    assert cache.slots == (12, 8, 4)  # memory follows the pyramid


@pytest.mark.parametrize("chunk", [1, 4, 12])
def test_knorm_keeps_the_smallest_key_norms(chunk):
    """KNorm keeps the smallest key norms (RoPE preserves norms, so pre- or post-RoPE agree)."""
    q, k, v = random_qkv(7, length=24)
    _, cache, _ = run(kvjax.policies.make("knorm", capacity=7), q, k, v, chunk=chunk)
    norms = np.linalg.norm(k[0, 0].astype(np.float64), axis=-1)  # [T, H]
    assert kept_sets(cache) == [sorted(np.argsort(norms[:, h])[:7].tolist()) for h in range(2)]


@pytest.mark.parametrize("chunk", [1, 4])
def test_streaming_llm_keeps_sinks_and_recent(chunk):
    """first `sinks` tokens never evicted, then the most recent."""
    q, k, v = random_qkv(8, length=24)
    _, cache, _ = run(kvjax.policies.make("streaming_llm", capacity=7, sinks=3), q, k, v, chunk=chunk)
    assert kept_sets(cache) == [[0, 1, 2, 20, 21, 22, 23]] * 2


def test_streaming_llm_rerotation_matches_reference():
    """keys rotated at their cache position, the query right after
    the cached tokens; compared with a float64 token-by-token reference."""
    sinks, capacity, t = 2, 5, 14
    q, k, v = random_qkv(9, length=t, q_heads=2, kv_heads=1)
    outs, _, _ = run(kvjax.policies.make("streaming_llm", capacity=capacity, sinks=sinks, rerotate=True), q, k, v, chunk=1)
    q0, k0, v0 = (np.asarray(x[0, 0], np.float64) for x in (q, k, v))
    cached = []
    for i in range(t):
        tokens = cached + [i]  # the step attends to the cache plus itself
        kr = np_rope(k0[tokens, 0], np.arange(len(tokens)))
        for head in range(2):
            want = np_softmax(kr @ np_rope(q0[i, head], len(tokens) - 1) / np.sqrt(8)) @ v0[tokens, 0]
            np.testing.assert_allclose(np.asarray(outs[0, 0, i, head]), want, rtol=1e-4, atol=1e-5)
        cached = tokens if len(tokens) <= capacity else tokens[:sinks] + tokens[sinks + 1 :]


def test_random_is_reproducible_and_depends_on_the_key():
    q, k, v = random_qkv(10, length=24)
    valid = jnp.ones((1, 24), bool)
    policy = kvjax.policies.make("random", capacity=6)
    a = kept_sets(run_layers(policy, q, k, v, valid, jax.random.key(1), chunk=4)[1])
    b = kept_sets(run_layers(policy, q, k, v, valid, jax.random.key(1), chunk=4)[1])
    c = kept_sets(run_layers(policy, q, k, v, valid, jax.random.key(2), chunk=4)[1])
    assert a == b and a != c


def test_window_output_is_attention_over_the_kept_tokens():
    """A compressed step equals full attention restricted to what the cache held."""
    q, k, v = random_qkv(11, length=10, q_heads=2, kv_heads=1)
    outs, _, _ = run(kvjax.policies.make("window", capacity=4), q, k, v, chunk=1)
    # The last query sees the 4 cached tokens (5..8) and itself.
    sub = slice(5, 10)
    kr = np_rope(k[0, 0, sub, 0], np.arange(5, 10))
    want = np_softmax(kr @ np_rope(q[0, 0, 9, 0], 9) / np.sqrt(8)) @ np.asarray(v[0, 0, sub, 0], np.float64)
    np.testing.assert_allclose(np.asarray(outs[0, 0, 9, 0]), want, rtol=1e-4, atol=1e-5)
    # ... which is not what the uncompressed cache gives (the check has teeth).
    assert not np.allclose(want, full_attention(q[0, 0], k[0, 0], v[0, 0])[9, 0], atol=1e-3)
