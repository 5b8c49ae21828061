"""The two selection paths (chunk sort/gather and one-token replacement) agree."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import select


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
