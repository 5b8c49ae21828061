"""DMC inference (arXiv 2403.09636, Sec. 3): learned append-or-merge against a float64 sequential reference."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.policies.dmc import OFFSET, OMEGA_EPS
from models import Llama, LlamaConfig
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
    """Outputs and final slots for random decisions and omegas (keys are RoPE at the newest
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
    """the first token appends, then the slot count grows by exactly 1 - alpha per step,
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
    """alpha = 1 after the first token leaves one slot per head: the omega-weighted mean of
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


# ----------------------------------------------------------------------------- training path


def tiny_dmc_model(seed=0, scale=6.0):
    """A tiny random Llama whose decision dimension merges about a fifth of the tokens."""
    cfg = LlamaConfig.tiny(head_dim=16, dmc_decisions=True)
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    for block in model.layers:
        for proj, heads in ((block.self_attn.k_proj, cfg.num_kv_heads), (block.self_attn.q_proj, cfg.num_heads)):
            last = jnp.arange(heads) * cfg.head_dim + cfg.head_dim - 1
            proj.kernel[...] = proj.kernel[...].at[:, last].multiply(scale)
    return model


@pytest.mark.parametrize("window", [12, 3, None])
def test_hard_training_attention_equals_inference_cache(window):
    """with hard decisions, the full-sequence training attention (partial states, the
    log(1 - alpha_{j+1}) mask) gives the inference cache's next-token NLL, and the mean alpha
    the cache's lengths (CR = T / len)."""
    from kvjax.evaluate import stream_nll
    from kvjax.retrofit import DMCTraining

    model = tiny_dmc_model()
    t = 40
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, 256)
    logits, aux = model.full_sequence(tokens, DMCTraining(window=window, hard=True).attention)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll_train = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    policy = kvjax.policies.make("dmc", capacity=t, merge_window=window)
    nll_cache = stream_nll(model, tokens, policy=policy, chunk_size=8)
    np.testing.assert_allclose(np.asarray(nll_train), np.asarray(nll_cache), rtol=1e-4, atol=1e-4)

    mean_alpha = np.asarray(jnp.stack(aux))  # [L, B]
    assert 0.05 < mean_alpha.mean() < 0.6, "the test model should merge some tokens"
    from kvjax.run import prefill

    cache = model.cache_spec().init(policy, 2)
    _, cache = prefill(model, tokens, jnp.ones_like(tokens, bool), cache, jax.random.key(0), chunk_size=8)
    lengths = np.asarray(cache.lengths())  # [L, B, H]
    np.testing.assert_allclose(mean_alpha, 1 - lengths.mean(-1) / t, atol=1e-6)


def test_relaxed_decisions_train_towards_the_target_ratio():
    """The Gumbel-sigmoid relaxation is differentiable: the one-sided compression loss has a
    gradient on the key projection (which makes alpha) and none once the target is met."""
    from flax import nnx

    from kvjax.retrofit import DMCTraining, compression_loss

    model = tiny_dmc_model(scale=1.0)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
    graphdef, params = nnx.split(model)

    def loss(params, cr):
        _, aux = nnx.merge(graphdef, params).full_sequence(tokens, DMCTraining().attention, jax.random.key(0))
        return compression_loss(jnp.stack(aux), jnp.float32(cr))

    value, grads = jax.value_and_grad(loss)(params, 4.0)
    assert float(value) > 0.5  # alpha ~ 0 at initialisation, target 0.75
    k_grad = grads["layers"][0]["self_attn"]["k_proj"]["kernel"][...]
    assert float(jnp.abs(k_grad).max()) > 0
    value1, grads1 = jax.value_and_grad(loss)(params, 1.0)
    assert float(value1) == 0.0 and float(jnp.abs(grads1["layers"][0]["self_attn"]["k_proj"]["kernel"][...]).max()) == 0.0


def test_relaxed_partial_states_match_float64_formula():
    """x_i = sum_j c_ij w_j x_j / sum_j c_ij w_j over the window, c_ij = prod_{m=j+1..i} alpha_m."""
    from kvjax.retrofit import partial_states

    rng = np.random.default_rng(0)
    t = 17
    x = rng.normal(size=(1, t, 2, 4))
    alpha, omega = rng.random((1, t, 2)), rng.random((1, t, 2)) + 0.1
    for window in (12, 3, None):
        got = np.asarray(partial_states(jnp.asarray(x, jnp.float32), jnp.asarray(alpha, jnp.float32), jnp.asarray(omega, jnp.float32), window))
        for i in range(t):
            js = range(max(0, i - window + 1) if window else 0, i + 1)
            c = np.array([np.prod(alpha[0, j + 1 : i + 1], axis=0) for j in js])  # [n, H]
            w = c * omega[0, list(js)]
            want = (w[..., None] * x[0, list(js)]).sum(0) / w.sum(0)[..., None]
            np.testing.assert_allclose(got[0, i], want, rtol=1e-4, atol=1e-5)


def test_generate_with_pallas_kernels_equals_xla():
    """The Pallas kernels (interpreted) serve DMC's per-head lengths: same tokens, same cache,
    in the jitted generate loop with a capacity small enough to force merges."""
    model = tiny_dmc_model()
    tokens = jax.random.randint(jax.random.key(4), (2, 20), 1, 256)
    policy = kvjax.policies.make("dmc", capacity=20)
    runs = {impl: kvjax.generate(model, tokens, policy=policy, max_new_tokens=6, chunk_size=8, impl=impl) for impl in ("xla", "pallas")}
    np.testing.assert_array_equal(runs["pallas"].tokens, runs["xla"].tokens)
    for a, b in zip(runs["pallas"].cache.layers, runs["xla"].cache.layers):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_allclose(a.k, b.k, rtol=1e-5, atol=1e-5)
    lengths = np.asarray(runs["xla"].cache.lengths())
    assert lengths.max() == 20 and lengths.min() < 20, "heads fill at their own pace, none beyond capacity"


def test_defaults_are_the_authors_window_of_12():
    """`make("dmc", capacity=c)` with no options averages the 12 newest members of a slot
    (float64 reference with 12 written out), and the retrofit trains with the same window."""
    t = 30
    q, k, v = decisions_qkv(11, t=t, merge_prob=0.9)  # groups longer than 12
    policy = kvjax.policies.make("dmc", capacity=t)
    outs, _, _ = run_layers(policy, q, k, v, jnp.ones((1, t), bool), jax.random.key(0), chunk=1)
    ref, _ = np_dmc(q[0, 0], k[0, 0], v[0, 0], capacity=t, window=12)
    np.testing.assert_allclose(np.asarray(outs[0, 0]), ref, rtol=2e-4, atol=2e-5)
    loss_default = inspect.signature(kvjax.retrofit.dmc_loss).parameters["window"].default
    assert policy.merge_window == kvjax.retrofit.DMCTraining().window == loss_default == 12


def test_an_untrained_decision_dimension_is_named():
    """DMC on a model that was never retrofitted warns, naming kvjax.retrofit; a retrofitted config does not."""
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"never trained") as caught:
        model.cache_spec().init(kvjax.policies.make("dmc", capacity=8), 1)
    assert "kvjax.retrofit" in str(caught[0].message)
    model.cfg = dataclasses.replace(model.cfg, dmc_decisions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.cache_spec().init(kvjax.policies.make("dmc", capacity=8), 1)
