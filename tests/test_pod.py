"""POD (arXiv 2412.02252, Sec. 3-4): distant keys shared inside layer blocks, checked against float64
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
    """no sharing, and a ring that holds everything: exactly full attention,
    with most tokens read from the distant ring."""
    q, k, v = random_qkv(1, layers=2, length=24)
    valid = jnp.ones((1, 24), bool)
    got, cache, _ = run_layers(pod(30, sinks=2, window=3), q, k, v, valid, jax.random.key(0), chunk=chunk)
    want, _, _ = run_layers(kvjax.policies.make("full", capacity=24), q, k, v, valid, jax.random.key(0), chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(cache.state[0].valid[0, 0].sum()) == 24 - 5


def test_all_proximal_is_full_attention_whatever_the_blocks():
    """with T <= sinks + window nothing is distant, so sharing changes nothing."""
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
    """non-owner (layer, head) pairs hold no distant keys; the saving on the distant
    ring's K+V is (L*H - owner pairs) / (2*L*H)."""
    spec = kvjax.CacheSpec(num_layers=4, kv_heads=2, head_dim=16, dtype="bfloat16")
    owners = ((0, 0), (0, 1), (0, 1), (3, 1))  # owner pairs: (0,0) (0,1) (1,1) (3,0)
    shared, alone = pod(100, sinks=4, window=16, owners=owners), pod(100, sinks=4, window=16)
    a, b = spec.init(shared, 1), spec.init(alone, 1)
    ring_kv = 2 * 4 * 2 * 80 * 16 * 2  # K and V, 4 layers, 2 heads, 80 slots, D 16, bf16
    owner_pairs = 4
    assert b.nbytes - a.nbytes == (8 - owner_pairs) * 80 * 16 * 2
    assert (b.nbytes - a.nbytes) / ring_kv == (8 - owner_pairs) / (2 * 8)
    assert [d.k.shape[1] for d in a.state] == [2, 1, 0, 1]


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


def test_training_attention_equals_the_decode_cache_path():
    """The fine-tuning path (full sequence, one masked softmax) equals step-by-step decoding
    through the POD cache when the ring holds every distant token; sharing is really used."""
    from kvjax.policies.pod import train_attention

    sinks, window, t_len = 2, 3, 16
    owners = ((0, 0), (1, 0))
    q, k, v = random_qkv(5, layers=2, length=t_len, q_heads=4, kv_heads=2)
    cache_out, _, _ = run_layers(pod(40, sinks=sinks, window=window, owners=owners), q, k, v, jnp.ones((1, t_len), bool), jax.random.key(0), chunk=1)
    pos = jnp.arange(t_len)[None, :, None]
    rope = kvjax.Rope(theta=10_000.0)
    rot = [rope(jnp.asarray(k[layer]), pos) for layer in range(2)]
    for layer in range(2):
        k_owner = jnp.stack([rot[owners[layer][h]][:, :, h] for h in range(2)], 2)
        out = train_attention(rope(jnp.asarray(q[layer]), pos), rot[layer], k_owner, jnp.asarray(v[layer]),
                              sinks=sinks, window=window, scale=q.shape[-1] ** -0.5)
        np.testing.assert_allclose(out, cache_out[layer], rtol=1e-5, atol=1e-5)
    unshared = train_attention(rope(jnp.asarray(q[1]), pos), rot[1], rot[1], jnp.asarray(v[1]), sinks=sinks, window=window, scale=q.shape[-1] ** -0.5)
    assert np.abs(np.asarray(unshared) - np.asarray(cache_out[1])).max() > 1e-3  # layer 1 head 1 reads layer 0's keys


def test_pod_with_snapkv_keeps_the_best_voted_distant_tokens():
    """POD + SnapKV: the distant ring keeps the tokens the observation window votes for
    (pooled over the distant tokens in position order), per KV head."""
    sinks, window, ring, obs, kernel, t_len = 2, 4, 6, 5, 3, 24
    policy = pod(sinks + window + ring, sinks=sinks, window=window, select="snapkv", select_window=obs, select_kernel=kernel)
    q, k, v = random_qkv(8, length=t_len, q_heads=4, kv_heads=2)
    _, cache, _ = run_layers(policy, q, k, v, jnp.ones((1, t_len), bool), jax.random.key(0), chunk=t_len)
    d = q.shape[-1]
    qr, kr = np_rope(q[0, 0], np.arange(t_len)[:, None]), np_rope(k[0, 0], np.arange(t_len)[:, None])
    distant = list(range(sinks, t_len - window))
    for h in range(2):
        votes = np.zeros(t_len)
        for qh in (2 * h, 2 * h + 1):
            for i in range(t_len - obs, t_len):
                votes[: i + 1] += np_softmax(kr[: i + 1, h] @ qr[i, qh] / np.sqrt(d)) / obs
        padded = np.concatenate([np.zeros(kernel // 2), votes[distant], np.zeros(kernel // 2)])
        pooled = [padded[i : i + kernel].mean() for i in range(len(distant))]
        want = sorted(distant[i] for i in sorted(range(len(distant)), key=lambda i: (-pooled[i], -i))[:ring])
        ring_h = cache.state[0]
        assert sorted(np.asarray(ring_h.pos[0, h])[np.asarray(ring_h.valid[0, h])].tolist()) == want


def test_shared_rings_follow_their_owner_with_selection():
    """With selection on top, a non-owner layer holds exactly its owner's distant tokens, with its own values."""
    policy = pod(12, sinks=1, window=3, owners=((0, 0), (0, 1)), select="snapkv", select_window=4)
    q, k, v = random_qkv(9, layers=2, length=32, q_heads=2, kv_heads=2)
    valid = jnp.ones((1, 32), bool)
    for chunk in (8, 1):
        _, cache, _ = run_layers(policy, q, k, v, valid, jax.random.key(0), chunk=chunk)
        own, shared = (jax.tree.map(np.asarray, cache.state[i]) for i in (0, 1))
        np.testing.assert_array_equal(own.pos[0, 0][own.valid[0, 0]], shared.pos[0, 0][shared.valid[0, 0]])
        assert own.valid[0, 0].sum() == 8
        for s in np.flatnonzero(shared.valid[0, 0]):
            np.testing.assert_array_equal(shared.v[0, 0, s], v[1, 0, shared.pos[0, 0, s], 0])


def test_post_training_loss_is_the_decode_paths_nll():
    """POD's post-training loss (`retrofit.pod_attention` through the model's full-sequence forward) equals the
    mean next-token NLL of decoding token by token through the POD cache, whose ring holds every distant
    token; the blocks share keys across all three layers, and without sharing the loss differs."""
    from kvjax import retrofit

    model = Llama(LlamaConfig.tiny(num_layers=3), rngs=nnx.Rngs(3))
    tokens = jax.random.randint(jax.random.key(1), (2, 25), 0, 256)
    owners, sinks, window = ((0, 0), (1, 0), (1, 0)), 2, 4
    loss = lambda blocks: float(retrofit.language_model_loss(retrofit.pod_attention(blocks, sinks=sinks, window=window))(  # noqa: E731
        model, tokens, 0, jax.random.key(0))[0])
    nll = np.asarray(kvjax.evaluate.stream_nll(model, tokens, policy=pod(32, sinks=sinks, window=window, owners=owners), chunk_size=1))
    np.testing.assert_allclose(loss(owners), nll.mean(), rtol=1e-5)
    unshared = ((0, 0), (1, 1), (2, 2))
    assert abs(loss(unshared) - nll.mean()) > 1e-4
