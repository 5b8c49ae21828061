"""DMC inference (spec §3, facts 17-22): learned append-or-merge against a float64 sequential reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.policies.dmc import OFFSET, OMEGA_EPS
from tests.helpers import np_rope, np_softmax, run_layers


def np_dmc(q, k, v, *, capacity, window):
    """One sequence, token by token, in float64: q [T, Hq, D], k/v [T, H, D] pre-RoPE.

    Returns the outputs [T, Hq, D] and, per KV head, the final slots as
    (rotated key, value, newest position, members)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    out = np.zeros((t, hq, d))
    final = []
    for head in range(h):
        groups = []
        omega = 1 / (1 + np.exp(-(q[:, head * g : (head + 1) * g, -1].mean(-1) + OFFSET))) + OMEGA_EPS
        ks = k[:, head].copy()
        ks[:, -1] = 0.0

        def slot(grp):
            members = grp[-window:] if window else grp
            w = omega[members]
            kbar = (w[:, None] * ks[members]).sum(0) / w.sum()
            vbar = (w[:, None] * v[members, head]).sum(0) / w.sum()
            return np_rope(kbar, grp[-1]), vbar, grp[-1], len(grp)

        for i in range(t):
            merge = (k[i, head, -1] - OFFSET > 0 and groups) or len(groups) >= capacity
            if merge:
                groups[-1].append(i)
            else:
                groups.append([i])
            slots = [slot(grp) for grp in groups]
            keys = np.stack([s[0] for s in slots])
            vals = np.stack([s[1] for s in slots])
            for j in range(g):
                qi = q[i, head * g + j].copy()
                qi[-1] = 0.0
                p = np_softmax(keys @ np_rope(qi, i) / np.sqrt(d))
                out[i, head * g + j] = p @ vals
        final.append([slot(grp) for grp in groups])
    return out, final


def decisions_qkv(seed, *, t, merge_prob, equal_omega=False, q_heads=4, kv_heads=2, d=8, layers=1):
    """Random q/k/v whose decision dimensions say merge with probability `merge_prob`."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(layers, 1, t, q_heads, d)).astype(np.float32)
    k = rng.normal(size=(layers, 1, t, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(layers, 1, t, kv_heads, d)).astype(np.float32)
    k[..., -1] = np.where(rng.random(k.shape[:-1]) < merge_prob, OFFSET + 2.0, OFFSET - 2.0)
    q[..., -1] = 0.7 if equal_omega else rng.normal(scale=3.0, size=q.shape[:-1])
    return q, k, v


def run_dmc(q, k, v, *, capacity, window, chunk=1, impl="xla"):
    policy = kvjax.policies.make("dmc", capacity=capacity, merge_window=window)
    valid = jnp.ones(q.shape[1:3], bool)
    return run_layers(policy, q, k, v, valid, jax.random.key(0), chunk=chunk)


@pytest.mark.parametrize("window", [None, 12, 3])
@pytest.mark.parametrize("capacity,chunk", [(24, 1), (24, 4), (5, 3)])
def test_dmc_matches_float64_reference(window, capacity, chunk):
    """Outputs and final slots for random decisions and omegas (fact 22: keys are RoPE at the newest
    position of the omega-weighted pre-RoPE mean); capacity 5 forces merges when a head is full."""
    t = 24
    q, k, v = decisions_qkv(capacity + chunk + (window or 0), t=t, merge_prob=0.5)
    outs, cache, _ = run_dmc(q, k, v, capacity=capacity, window=window, chunk=chunk)
    ref_out, ref_slots = np_dmc(q[0, 0], k[0, 0], v[0, 0], capacity=capacity, window=window)
    np.testing.assert_allclose(np.asarray(outs[0, 0]), ref_out, rtol=2e-4, atol=2e-5)
    lc = jax.tree.map(np.asarray, cache.layers[0])
    for head, slots in enumerate(ref_slots):
        n = len(slots)
        assert lc.valid[0, head].tolist() == [True] * n + [False] * (capacity - n)
        np.testing.assert_allclose(lc.k[0, head, :n], np.stack([s[0] for s in slots]), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(lc.v[0, head, :n], np.stack([s[1] for s in slots]), rtol=2e-4, atol=2e-5)
        assert lc.pos[0, head, :n].tolist() == [s[2] for s in slots]
        assert lc.score[0, head, :n].tolist() == [s[3] for s in slots]
    assert lc.valid.sum(-1).max() <= capacity


def test_length_grows_by_one_minus_alpha():
    """Fact 20: the first token appends, then the slot count grows by exactly 1 - alpha per step,
    and the achieved compression ratio is T / len."""
    t = 20
    q, k, v = decisions_qkv(7, t=t, merge_prob=0.6)
    _, cache, history = run_dmc(q, k, v, capacity=t, window=12)
    lengths = np.asarray(history.layers[0].valid.sum(-1))[:, 0]  # [T, H]
    alpha = (k[0, 0, :, :, -1] > OFFSET).astype(int)
    alpha[0] = 0
    np.testing.assert_array_equal(np.diff(np.concatenate([np.zeros((1, 2), int), lengths]), axis=0), 1 - alpha)
    np.testing.assert_allclose(np.asarray(cache.compression_ratio())[0, 0], t / lengths[-1])


@pytest.mark.parametrize("window", [None, 12])
def test_always_merge_is_one_weighted_mean(window):
    """Fact 18: alpha = 1 after the first token leaves one slot per head: the omega-weighted mean of
    all tokens (running mean) or of the last 12 (the authors' window); equal omegas give the plain mean."""
    t = 20
    for equal in (False, True):
        q, k, v = decisions_qkv(3, t=t, merge_prob=1.0, equal_omega=equal)
        _, cache, _ = run_dmc(q, k, v, capacity=8, window=window)
        lc = jax.tree.map(np.asarray, cache.layers[0])
        members = np.arange(t)[-window:] if window else np.arange(t)
        for head in range(2):
            assert lc.valid[0, head].sum() == 1
            omega = 1 / (1 + np.exp(-(q[0, 0, members, 2 * head : 2 * head + 2, -1].astype(np.float64).mean(-1) + OFFSET))) + OMEGA_EPS
            if equal:
                omega = np.ones_like(omega)
            ks = k[0, 0, members, head].astype(np.float64)
            ks[:, -1] = 0
            kbar = (omega[:, None] * ks).sum(0) / omega.sum()
            vbar = (omega[:, None] * v[0, 0, members, head]).sum(0) / omega.sum()
            np.testing.assert_allclose(lc.k[0, head, 0], np_rope(kbar, t - 1), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(lc.v[0, head, 0], vbar, rtol=1e-4, atol=1e-5)


def test_dmc_state_rejects_bad_window():
    with pytest.raises(ValueError, match="merge_window"):
        kvjax.policies.make("dmc", capacity=8, merge_window=0)
