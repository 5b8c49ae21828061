"""POD (spec §4, facts 23-25): distant keys shared inside layer blocks, checked against float64
attention over the right key sets; memory accounting; calibration of the blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import calibrate
from models import Llama, LlamaConfig
from tests.helpers import np_rope, np_softmax, random_qkv, run_layers


def pod(capacity, **kw):
    return kvjax.policies.make("pod", capacity=capacity, **kw)


@pytest.mark.parametrize("chunk", [1, 4])
def test_blocks_of_size_one_are_full_attention(chunk):
    """Fact 23: no sharing, and a ring that holds everything: exactly full attention,
    with most tokens read from the distant ring."""
    q, k, v = random_qkv(1, layers=2, length=24)
    valid = jnp.ones((1, 24), bool)
    got, cache, _ = run_layers(pod(30, sinks=2, window=3), q, k, v, valid, jax.random.key(0), chunk=chunk)
    want, _, _ = run_layers(kvjax.policies.make("full", capacity=24), q, k, v, valid, jax.random.key(0), chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(cache.distant[0].valid[0, 0].sum()) == 24 - 5


def test_all_proximal_is_full_attention_whatever_the_blocks():
    """Fact 24: with T <= sinks + window nothing is distant, so sharing changes nothing."""
    q, k, v = random_qkv(2, layers=3, length=12)
    valid = jnp.ones((1, 12), bool)
    shared = pod(14, sinks=4, window=8, owners=((0,), (0,), (0,)))
    got, _, _ = run_layers(shared, q, k, v, valid, jax.random.key(0), chunk=1)
    want, _, _ = run_layers(kvjax.policies.make("full", capacity=12), q, k, v, valid, jax.random.key(0), chunk=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_shared_distant_keys_match_float64_reference():
    """Layer 1 shares layer 0's distant keys (heads split 1:1): one softmax over own proximal keys,
    layer 0's distant keys and own values; the ring keeps the last R tokens that left the window."""
    sinks, window, ring, t_len = 2, 3, 5, 20
    policy = pod(sinks + window + ring, sinks=sinks, window=window, owners=((0, 0), (1, 0)))  # layer 1: head 0 own, head 1 shared
    q, k, v = random_qkv(3, layers=2, length=t_len, q_heads=4, kv_heads=2)
    got, _, _ = run_layers(policy, q, k, v, jnp.ones((1, t_len), bool), jax.random.key(0), chunk=1)
    got = np.asarray(got)
    for layer in range(2):
        for t in range(t_len):
            for qh in range(4):
                h = qh // 2
                shares = layer == 1 and h == 1
                # distant: the last `ring` tokens that left the window; a non-owner misses the one its owner overwrote this step
                first = t - window - ring + (1 if shares else 0)
                seen = [j for j in range(t + 1) if j < sinks or j >= t - window or (j >= max(first, sinks) and j >= sinks)]
                distant = [j for j in seen if sinks <= j < t - window]
                keys = np.stack([k[0 if (shares and j in distant) else layer, 0, j, h] for j in seen])
                logits = np_rope(q[layer, 0, t, qh], t) @ np_rope(keys, np.array(seen)).T / np.sqrt(q.shape[-1])
                want = np_softmax(logits) @ v[layer, 0, seen, h]
                np.testing.assert_allclose(got[layer, 0, t, qh], want, rtol=1e-4, atol=1e-5, err_msg=f"layer {layer} t {t} head {qh}")


def test_memory_accounting_matches_the_formula():
    """Fact 25: non-owner (layer, head) pairs hold no distant keys; the saving on the distant
    ring's K+V is (L*H - owner pairs) / (2*L*H)."""
    spec = kvjax.CacheSpec(num_layers=4, kv_heads=2, head_dim=16, dtype="bfloat16")
    owners = ((0, 0), (0, 1), (0, 1), (3, 1))  # owner pairs: (0,0) (0,1) (1,1) (3,0)
    shared, alone = pod(100, sinks=4, window=16, owners=owners), pod(100, sinks=4, window=16)
    a, b = spec.init(shared, 1), spec.init(alone, 1)
    ring_kv = 2 * 4 * 2 * 80 * 16 * 2  # K and V, 4 layers, 2 heads, 80 slots, D 16, bf16
    owner_pairs = 4
    assert b.nbytes - a.nbytes == (8 - owner_pairs) * 80 * 16 * 2
    assert (b.nbytes - a.nbytes) / ring_kv == (8 - owner_pairs) / (2 * 8)
    assert [d.k.shape[1] for d in a.distant] == [2, 1, 0, 1]


def test_bad_owner_tables_are_rejected():
    with pytest.raises(ValueError, match="must name layers 0..1"):
        pod(40, owners=((0,), (2,)))
    with pytest.raises(ValueError, match="does not store its own keys"):
        pod(40, owners=((0,), (0,), (1,)))
    with pytest.raises(ValueError, match="one per KV head"):
        kvjax.CacheSpec(num_layers=2, kv_heads=2, head_dim=8).init(pod(40, sinks=2, window=2, owners=((0, 0, 0), (0, 0, 0))), 1)


def test_group_layers_greedy_by_js_similarity():
    base = np.array([0.7, 0.2, 0.1])
    flat = np.ones(3) / 3
    dists = np.stack([base, base, flat, flat * 1.0001, base])[:, None]  # [layers, 1 head, keys]
    assert calibrate.group_layers(dists, 0.99) == ((0,), (0,), (2,), (2,), (4,))
    assert calibrate.group_layers(dists, 0.0) == ((0,),) * 5  # everything similar enough: one block
    assert calibrate.group_layers(dists, 1.01) == tuple((i,) for i in range(5))  # delta > 1: blocks of one
    p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert calibrate.js_similarity(p, q) == pytest.approx(0.0) and calibrate.js_similarity(p, p) == pytest.approx(1.0)


def test_pod_blocks_from_the_tiny_model_round_trip(tmp_path):
    model = Llama(LlamaConfig.tiny(num_layers=3), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (1, 96), 1, 256)
    owners = calibrate.pod_blocks(model, tokens, delta=0.5, sinks=4, window=8, queries=16, chunk_size=32)
    assert len(owners) == 3 and all(len(row) == 2 for row in owners)
    assert calibrate.pod_blocks(model, tokens, delta=1.01, sinks=4, window=8, queries=16, chunk_size=32) == ((0, 0), (1, 1), (2, 2))
    path = tmp_path / "blocks.json"
    calibrate.save_blocks(path, owners)
    assert calibrate.load_blocks(path) == owners
    path.write_text("not json")
    with pytest.raises(ValueError, match="is not a POD blocks file"):
        calibrate.load_blocks(path)
    policy = pod(64, sinks=4, window=8, owners=owners)
    out = kvjax.generate(model, tokens[:, :40], policy=policy, max_new_tokens=4)
    assert out.cache.nbytes <= model.cache_spec().init(pod(64, sinks=4, window=8), 1).nbytes
