"""The two selection paths (chunk sort/gather and one-token replacement) agree, and follow the tie rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvjax
from kvjax import select
from tests.helpers import ROPE, random_qkv, run_layers


@settings(max_examples=40)
@given(
    slots=st.integers(1, 8),
    fill=st.integers(0, 8),
    new_valid=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_evicting_one_keeps_the_same_set_as_select_chunk(slots, fill, new_valid, seed):
    rng = np.random.default_rng(seed)
    fill = min(fill, slots)
    n = slots + 1
    # Few distinct scores, so ties (broken by position) are common.
    score = rng.integers(0, 3, size=(1, 1, n)).astype(np.float32)
    valid = np.zeros((1, 1, n), bool)
    valid[..., rng.permutation(slots)[:fill]] = True
    valid[..., -1] = new_valid
    pos = np.where(valid, rng.permutation(100)[:n], -1).astype(np.int32)
    protected = valid & (rng.random((1, 1, n)) < 0.2)
    r = select.rank(jnp.asarray(score), jnp.asarray(valid), jnp.asarray(protected))

    chunk = select.select_chunk(dict(pos=jnp.asarray(pos), valid=jnp.asarray(valid)), r, slots)
    want = sorted(np.asarray(chunk["pos"])[np.asarray(chunk["valid"])].tolist())

    drop = int(select.evict_index(r, jnp.asarray(pos))[0, 0])
    got_pos, got_valid = pos[0, 0, :slots].copy(), valid[0, 0, :slots].copy()
    if drop < slots and new_valid:
        got_pos[drop], got_valid[drop] = pos[0, 0, -1], True
    got = sorted(got_pos[got_valid].tolist())
    assert got == want
    assert len(got) <= slots


def test_write_slot_skips_out_of_range_targets():
    x = jnp.zeros((1, 2, 3))
    out = select.write_slot(x, jnp.array([[0, 3]]), jnp.array([[5.0, 7.0]]))
    np.testing.assert_array_equal(out[0], [[5, 0, 0], [0, 0, 0]])


def test_equal_ranks_evict_the_older_token():
    """The documented rule, directly: among equal ranks the lowest position goes first, in both paths."""
    pos = jnp.asarray([[[5, 2, 9, 7]]], jnp.int32)
    valid = jnp.ones((1, 1, 4), bool)
    rank = select.rank(jnp.zeros((1, 1, 4)), valid, jnp.zeros((1, 1, 4), bool))
    assert int(select.evict_index(rank, pos)[0, 0]) == 1  # position 2, the oldest
    kept = select.select_chunk(dict(pos=pos, valid=valid), rank, 3)
    assert sorted(np.asarray(kept["pos"][0, 0]).tolist()) == [5, 7, 9]


@pytest.mark.parametrize("chunk", [1, 4])
def test_streaming_llm_keeps_the_sink_and_the_newest(chunk):
    """StreamingLLM at capacity 6 (1 sink, protected window 2): after 12 tokens the
    unprotected slots hold the newest tokens, so the kept set is [0, 7, 8, 9, 10, 11]."""
    policy = kvjax.policies.make("streaming_llm", capacity=6, sinks=1, window=2)
    q, k, v = random_qkv(0, length=12)
    _, cache, _ = run_layers(policy, q, k, v, jnp.ones((1, 12), bool), jax.random.key(0), chunk=chunk)
    lc = cache.layers[0]
    for h in range(lc.pos.shape[1]):
        assert sorted(np.asarray(lc.pos[0, h])[np.asarray(lc.valid[0, h])].tolist()) == [0, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("scale", [1, 2**25])  # 2**25: past the packed sort's limit, the argsort branch
def test_position_order_is_a_stable_argsort(scale):
    """Packed (position, index) sort or argsort: numpy's stable argsort with empty candidates last,
    and `inverse` undoes it."""
    rng = np.random.default_rng(scale)
    pos = np.stack([rng.permutation(50) * scale for _ in range(6)]).reshape(2, 3, 50)
    valid = rng.random(pos.shape) < 0.7
    got = np.asarray(select.position_order(jnp.asarray(pos, jnp.int32), jnp.asarray(valid)))
    np.testing.assert_array_equal(got, np.argsort(np.where(valid, pos, 2**31 - 1), -1, kind="stable"))
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(select.inverse(jnp.asarray(got))), got, -1),
                                  np.broadcast_to(np.arange(50), got.shape))


@pytest.mark.parametrize("k", [1, 7, 40])
def test_kth_largest_threshold_is_top_k(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(3, 40)).astype(np.float32)
    x[0, :5], x[1, :3], x[1, 3], x[2, :20] = -np.inf, 0.0, -0.0, 1.5  # infinities, signed zeros, ties
    np.testing.assert_array_equal(select.kth_largest_threshold(jnp.asarray(x), k), np.sort(x, -1)[:, 40 - k :][:, :1])


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_full_cache_fills_its_slots_in_order_keeping_what_keep_best_keeps(chunk):
    """`Full.keep` writes a chunk into the next free slots without sorting. After every chunk it must
    hold the tokens the scorer tier's general `keep_best` (sort and gather) holds, with the same keys
    and values, packed in order at the front (padding on both sides and a hole in a row)."""
    from kvjax.policies.full import Full
    from kvjax.policies.scorer import ScorerPolicy

    class SortingFull(Full):
        keep = ScorerPolicy.keep

    t, slots = 24, 26
    valid = np.zeros((2, t), bool)
    valid[0, :17] = True
    valid[1, 5:] = True
    valid[1, 11:13] = False
    q, k, v = random_qkv(7, batch=2, length=t)
    (out, _, history), (ref_out, _, ref_history) = (
        run_layers(p(capacity=slots), q, k, v, jnp.asarray(valid), jax.random.key(0), chunk=chunk) for p in (Full, SortingFull))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-6)  # slots in another order
    got, want = (jax.tree.map(np.asarray, h.layers[0]) for h in (history, ref_history))
    for i in np.ndindex(got.valid.shape[:3]):  # (chunk, row, KV head)
        by_pos = lambda lc: {int(p): (lc.k[i][s].tolist(), lc.v[i][s].tolist()) for s, p in enumerate(lc.pos[i]) if lc.valid[i][s]}  # noqa: E731
        assert by_pos(got) == by_pos(want)
        n = got.valid[i].sum()
        np.testing.assert_array_equal(got.valid[i], np.arange(slots) < n)
        np.testing.assert_array_equal(np.diff(got.pos[i][:n]) > 0, True)  # in position order


def test_full_cache_fills_the_holes_of_a_cache_handed_over_first():
    """A cache whose slots the caller masked (the kvpress protocol's reference does) keeps every valid
    slot; the next chunk's tokens take the free slots lowest first, then a decode token the next."""
    from kvjax.policies.full import Full
    from kvjax.run import make_step

    q, k, v = (jnp.asarray(x[0]) for x in random_qkv(3, length=9))  # [1, 9, heads, D]
    cache = kvjax.CacheSpec(num_layers=1, kv_heads=k.shape[2], head_dim=k.shape[3]).init(Full(capacity=8), 1)

    def feed(cache, first, end):
        step = make_step(cache, jnp.ones((1, end - first), bool), jax.random.key(0), prefill=end - first > 1)
        _, cache = kvjax.attend(cache, 0, q[:, first:end], k[:, first:end], v[:, first:end], step=step, rope=ROPE, scale=0.5)
        return cache.replace(seen=step.seen_after)

    cache = feed(cache, 0, 5)
    lc = cache.layers[0]
    cache = cache.replace_layer(0, lc.replace(valid=lc.valid.at[..., jnp.array([1, 3])].set(False)))
    cache = feed(feed(cache, 5, 8), 8, 9)
    lc = jax.tree.map(np.asarray, cache.layers[0])
    np.testing.assert_array_equal(lc.valid, np.broadcast_to(np.arange(8) < 7, lc.valid.shape))
    np.testing.assert_array_equal(lc.pos[0, :, :7], np.broadcast_to([0, 5, 2, 6, 4, 7, 8], (lc.pos.shape[1], 7)))
