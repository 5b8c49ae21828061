"""Every registered policy, one property matrix (a new policy is covered for free)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.policies import KeyRerotation, MergingPolicy, ScorerPolicy
from tests.helpers import full_attention, random_qkv, run_layers


def keeps_original_tokens(policy: kvjax.Policy) -> bool:
    """Eviction only: every kept slot is some token's own (k, v)."""
    inner = policy.inner if isinstance(policy, KeyRerotation) else policy
    return isinstance(inner, ScorerPolicy) and not isinstance(inner, MergingPolicy)


def make_policy(name: str, capacity: int, layers: int = 1, rerotate: bool = False) -> kvjax.Policy:
    """A policy of each kind whose protected tokens fit small capacities."""
    options = {
        "streaming_llm": dict(sinks=min(2, capacity - 1), rerotate=rerotate),
        "window": dict(rerotate=rerotate),
        "snapkv": dict(window=min(2, capacity), kernel=3),
        "pyramidkv": dict(window=1, kernel=3, beta=2.0),  # layer count: the model's
        "bct": dict(sinks=1, window=1),
        "kvmerger": dict(protect=1, exclude_layers=(1,)),  # layer 0 merges, layer 1 evicts
        "pod": dict(sinks=1, window=1, owners=((0,), (0,)) if layers == 2 else None),  # layer 1 reads layer 0's distant keys
    }.get(name, {})
    return kvjax.policies.make(name, capacity=capacity, **options)


POLICIES = kvjax.policies.names()


T = 24  # one padded length (a multiple of every chunk size) so programs are reused


def padded_batch(draw_lengths):
    """Two rows with different real lengths and padding on both sides."""
    t = T
    valid = np.zeros((2, t), bool)
    valid[0, : draw_lengths[0]] = True  # right padding
    valid[1, t - draw_lengths[1] :] = True  # left padding
    return t, valid


@pytest.mark.parametrize("name", POLICIES)
@given(
    capacity=st.integers(3, 10),
    lengths=st.tuples(st.integers(1, T), st.integers(1, T)),
    chunk=st.sampled_from([1, 3, 4]),
    groups=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
    rerotate=st.booleans(),
)
def test_policy_invariants(name, capacity, lengths, chunk, groups, rerotate):
    layers = 2
    q_heads, kv_heads = groups
    policy = make_policy(name, capacity if name != "full" else T, layers, rerotate)
    t, valid = padded_batch(lengths)
    q, k, v = random_qkv(capacity + 7 * t, layers=layers, batch=2, length=t, q_heads=q_heads, kv_heads=kv_heads)
    args = (policy, q, k, v, jnp.asarray(valid), jax.random.key(3))
    outs, cache, history = run_layers(*args, chunk=chunk)

    # Deterministic for a fixed key.
    outs2, cache2, _ = run_layers(*args, chunk=chunk)
    chex.assert_trees_all_equal((outs, cache), (outs2, cache2))

    seen = np.cumsum(valid.reshape(2, -1, chunk).sum(-1), axis=1).T  # [chunks, B]
    slots = tuple(p.slots for p in cache.policies)
    assert cache.slots == slots
    sinks, window = getattr(policy, "sinks", 0), getattr(policy, "window", 0)
    for c in range(t // chunk):
        snap = jax.tree.map(lambda x: np.asarray(x[c]), history)
        for layer in range(layers):
            lc = snap.layers[layer]
            n_valid = lc.valid.sum(-1)  # [B, H]
            # Never more than the layer's slots; nothing dropped while there is room.
            np.testing.assert_array_equal(n_valid, np.broadcast_to(np.minimum(seen[c], slots[layer])[:, None], n_valid.shape))
            for b in range(2):
                for h in range(kv_heads):
                    kept = set(lc.pos[b, h][lc.valid[b, h]].tolist())
                    assert len(kept) == n_valid[b, h], "a token occupies two slots"
                    assert kept <= set(range(seen[c][b])), "a slot holds a position never seen"
                    protected = set(range(min(sinks, seen[c][b])))
                    protected |= set(range(max(seen[c][b] - window, 0), seen[c][b]))
                    assert protected <= kept, f"protected tokens {sorted(protected - kept)} were evicted"

    # Padding queries return zeros; real ones are finite.
    out = np.asarray(outs)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, ~valid], 0.0)

    # Eviction: every kept slot is bit-identical to the token's own (k, v).
    evicting = [layer for layer, p in enumerate(cache.policies) if keeps_original_tokens(p)]
    if evicting:
        full = kvjax.policies.make("full", capacity=T)
        _, ref, _ = run_layers(full, q, k, v, jnp.asarray(valid), jax.random.key(3), chunk=chunk)
        for layer in evicting:
            r, c = (jax.tree.map(np.asarray, x.layers[layer]) for x in (ref, cache))
            for b in range(2):
                for h in range(kv_heads):
                    by_pos_k = {p: r.k[b, h, s] for s, p in enumerate(r.pos[b, h]) if r.valid[b, h, s]}
                    by_pos_v = {p: r.v[b, h, s] for s, p in enumerate(r.pos[b, h]) if r.valid[b, h, s]}
                    for s in np.flatnonzero(c.valid[b, h]):
                        p = int(c.pos[b, h, s])
                        if isinstance(cache.policies[layer], KeyRerotation):  # stored before RoPE: the raw key
                            row = np.flatnonzero(valid[b])[p]
                            np.testing.assert_array_equal(c.k[b, h, s], k[layer, b, row, h])
                        else:
                            np.testing.assert_array_equal(c.k[b, h, s], by_pos_k[p])
                        np.testing.assert_array_equal(c.v[b, h, s], by_pos_v[p])


@pytest.mark.parametrize("name", POLICIES)
@given(length=st.integers(2, 14), chunk=st.sampled_from([1, 2, 5]), rerotate=st.booleans())
def test_capacity_at_least_length_is_full_attention(name, length, chunk, rerotate):
    """with capacity >= tokens seen every policy is exact attention."""
    t = -(-length // chunk) * chunk
    valid = np.arange(t)[None] < length
    policy = make_policy(name, 16, layers=1, rerotate=rerotate)
    if name == "pyramidkv":  # its smallest layer budget must cover the sequence too
        policy = kvjax.policies.make("pyramidkv", capacity=16, window=1, kernel=3)
    q, k, v = random_qkv(length * 31 + chunk, length=t, q_heads=4, kv_heads=2)
    if name == "dmc":  # always appending is vanilla attention without the decision dimension
        q[..., -1] = k[..., -1] = 0.0
    outs, cache, _ = run_layers(policy, q, k, v, jnp.asarray(valid), jax.random.key(0), chunk=chunk)
    ref = full_attention(q[0, 0, :length], k[0, 0, :length], v[0, 0, :length])
    np.testing.assert_allclose(np.asarray(outs[0, 0, :length]), ref, rtol=1e-4, atol=1e-5)
    lc = cache.layers[0]
    kept = list(np.asarray(lc.pos[0, 0])[np.asarray(lc.valid[0, 0])])
    if name == "pod":  # proximal slots + the distant ring
        kept += list(np.asarray(cache.state[0].pos[0, 0])[np.asarray(cache.state[0].valid[0, 0])])
    assert sorted(kept) == list(range(length))
