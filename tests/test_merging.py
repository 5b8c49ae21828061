"""Merging policies (BCT, KVMerger) against float64 numpy versions of their rules (arXiv 2411.15785; arXiv 2407.08454, Sec. 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import select
from kvjax.cache import LayerCache
from kvjax.policies.base import Step
from kvjax.policies.kvmerger import _merge_runs
from kvjax.policies.scorer import Candidates


def fields(seed, n, d=6, *, similar_runs=()):
    """Candidates of one (row, head) in shuffled slot order; `similar_runs` makes runs of near-equal keys."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(n, d))
    for start, length in similar_runs:
        k[start : start + length] = k[start] + 0.05 * rng.normal(size=(length, d))
    perm = rng.permutation(n)
    return dict(k=k[perm], v=rng.normal(size=(n, d))[perm], pos=np.arange(n)[perm], valid=np.ones(n, bool),
                score=rng.random(n)[perm] * 3)


def np_kvmerger(f, slots, protect):
    """Float64 KVMerger on one (row, head): sets of consecutive positions, Gaussian merge towards the pivot."""
    o = np.argsort(f["pos"])
    k, v, pos, score = (f[x][o].astype(np.float64) for x in ("k", "v", "pos", "score"))
    n = len(k)
    prot = np.zeros(n, bool)
    prot[np.argsort(-score, kind="stable")[:protect]] = True
    sims = np.array([k[i] @ k[i + 1] / np.linalg.norm(k[i]) / np.linalg.norm(k[i + 1]) for i in range(n - 1)])
    eligible = ~prot[:-1] & ~prot[1:]
    cand = [i for i in np.argsort(-np.where(eligible, sims, -np.inf), kind="stable") if eligible[i]]
    joined = set(cand[: max(n - slots, 0)])
    sets, cur = [], [0]
    for i in range(1, n):
        if i - 1 in joined:
            cur.append(i)
        else:
            sets.append(cur)
            cur = [i]
    sets.append(cur)
    out = {}
    for s in sets:
        p = s[int(np.argmax(score[s]))]
        dist = np.linalg.norm(k[s] - k[p], axis=1)
        sigma = dist.mean() / np.sqrt(2)
        g = np.where(dist > 0, np.exp(-(dist**2) / (2 * max(sigma, 1e-30) ** 2)), 1.0)
        w = g / g.sum()
        out[int(pos[p])] = dict(k=w @ k[s], v=w @ v[s], score=score[s].sum(), members=pos[s].astype(int).tolist(), w=w, pivot=s.index(p))
    return out


def run_merge(policy, f, slots):
    batched = {n: jnp.asarray(x)[None, None] for n, x in f.items()}
    for n in ("k", "v", "score"):
        batched[n] = batched[n].astype(jnp.float32)
    step = Step(seen=jnp.array([len(f["pos"])]), positions=jnp.zeros((1, 1), jnp.int32), new_valid=jnp.ones((1, 1), bool), key=jax.random.key(0))
    out = jax.jit(lambda b: policy.merge(b, None, step, slots))(batched)
    return {n: np.asarray(x[0, 0]) for n, x in out.items()}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("slots", [5, 9, 16])
def test_kvmerger_matches_float64_reference(seed, slots):
    f = fields(seed, 16, similar_runs=((2, 4), (9, 3)))
    policy = kvjax.policies.make("kvmerger", capacity=slots, protect=2, exclude_layers=())
    got = run_merge(policy, f, slots)
    want = np_kvmerger(f, slots, protect=2)
    assert got["valid"].sum() == slots == len(want)  # the slot count equals the budget exactly
    for s in np.flatnonzero(got["valid"]):
        ref = want[int(got["pos"][s])]
        np.testing.assert_allclose(got["k"][s], ref["k"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["v"][s], ref["v"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["score"][s], ref["score"], rtol=1e-5)


def test_kvmerger_set_properties():
    """Facts 14-16: singletons unchanged, convex weights with the pivot's largest, sets consecutive,
    protected tokens singletons."""
    f = fields(7, 24, similar_runs=((3, 6), (12, 5)))
    want = np_kvmerger(f, 14, protect=3)
    got = run_merge(kvjax.policies.make("kvmerger", capacity=14, protect=3, exclude_layers=()), f, 14)
    top3 = set(np.asarray(f["pos"])[np.argsort(-f["score"])[:3]].tolist())
    by_pos = {int(p): i for i, p in enumerate(f["pos"])}
    merged_any = False
    for pivot, s in want.items():
        members = s["members"]
        assert members == list(range(members[0], members[-1] + 1))  # consecutive
        np.testing.assert_allclose(s["w"].sum(), 1.0)
        assert (s["w"] >= 0).all() and s["w"][s["pivot"]] == s["w"].max()
        if len(members) == 1:  # a singleton is bit-identical to the token
            slot = int(np.flatnonzero(got["pos"] == pivot)[0])
            np.testing.assert_array_equal(got["k"][slot], np.float32(f["k"][by_pos[pivot]]))
            np.testing.assert_array_equal(got["v"][slot], np.float32(f["v"][by_pos[pivot]]))
        else:
            merged_any = True
            assert not top3 & set(members), "a protected token was merged"
    assert merged_any


def test_identical_keys_merge_to_themselves():
    """equal keys give equal weights: the key itself and the plain mean of the values."""
    n, d = 6, 4
    rng = np.random.default_rng(0)
    key = rng.normal(size=d)
    g = dict(k=jnp.asarray(np.tile(key, (n, 1)), jnp.float32), v=jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
             pos=jnp.arange(n), valid=jnp.ones(n, bool), score=jnp.asarray(rng.random(n), jnp.float32), protected=jnp.zeros(n, bool))
    out = _merge_runs(g, 1, "mean")
    np.testing.assert_allclose(out["k"][0], key, rtol=1e-6)
    np.testing.assert_allclose(out["v"][0], np.asarray(g["v"]).mean(0), rtol=1e-5)
    assert np.asarray(out["valid"]).sum() == 1


def decode_candidates(seed, capacity, filled, d=8, batch=3, heads=2):
    """A layer holding `filled` of `capacity` slots per (row, head) at shuffled slots, with runs of similar
    keys, and one new token per row (row 2's is padding)."""
    rng = np.random.default_rng(seed)
    seen = 3 * capacity
    pos = np.full((batch, heads, capacity), -1)
    k = np.zeros((batch, heads, capacity, d))
    for b in range(batch):
        for h in range(heads):
            keep = np.sort(rng.choice(seen - 1, filled, replace=False)) if filled < seen else np.arange(seen)
            keys = rng.normal(size=(filled, d))
            for start in rng.choice(filled - 3, 3, replace=False):
                keys[start : start + 3] = keys[start] + 0.05 * rng.normal(size=(3, d))
            slot = rng.permutation(capacity)[:filled]
            pos[b, h, slot], k[b, h, slot] = keep, keys
    valid = pos >= 0
    lc = LayerCache(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(rng.normal(size=k.shape) * valid[..., None], jnp.float32),
                    pos=jnp.asarray(pos, jnp.int32), valid=jnp.asarray(valid), score=jnp.asarray(rng.random(pos.shape) * valid, jnp.float32))
    step = Step(seen=jnp.full((batch,), seen - 1), positions=jnp.full((batch, 1), seen - 1, jnp.int32),
                new_valid=jnp.asarray([[True]] * (batch - 1) + [[False]]), key=jax.random.key(seed), prefill=False)
    new = lambda: jnp.asarray(rng.normal(size=(batch, 1, heads, d)), jnp.float32)  # noqa: E731
    mass = jnp.asarray(rng.random((batch, heads, capacity + 1)), jnp.float32)
    return lc, Candidates.of(lc, new(), new(), step, mass, group=2, written_after=jnp.zeros((batch, 1, 2 * heads, d))), step


def by_position(lc):
    """Per (row, head): position -> (k, v, score) of each valid slot."""
    lc = jax.tree.map(np.asarray, lc)
    return [[{int(lc.pos[b, h, s]): (lc.k[b, h, s], lc.v[b, h, s], lc.score[b, h, s]) for s in np.flatnonzero(lc.valid[b, h])}
             for h in range(lc.pos.shape[1])] for b in range(lc.pos.shape[0])]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("filled", "options"), [
    (24, dict(protect=3)), (24, dict(protect=2, sinks=2, window=3, sigma=0.7)), (17, dict(protect=3)),
    (24, dict(protect=22, window=1)),  # two unprotected candidates: rarely neighbours, so one is evicted
])
def test_kvmerger_decode_step_keeps_the_sets_of_the_rebuild(seed, filled, options):
    """A decode step joins at most one pair and writes it in place (`_join_one`): the kept slots, their
    keys, values and scores equal those of the full rebuild (`merge`), which the float64 tests check."""
    capacity = 24
    policy = kvjax.policies.make("kvmerger", capacity=capacity, exclude_layers=(), **options)
    lc, cand, step = decode_candidates(seed, capacity, filled)
    score = policy.score(cand, step, 0)
    fast = jax.jit(lambda lc, cand, score: policy.keep(lc, cand, score, None, step))(lc, cand, score)
    rebuilt = select.as_layer(policy.merge(cand.fields(score), cand, step, capacity))
    assert np.array_equal(np.asarray(fast.valid).sum(-1), np.asarray(rebuilt.valid).sum(-1))
    joined = 0
    for row_fast, row_rebuilt, row_before in zip(by_position(fast), by_position(rebuilt), by_position(lc)):
        for got, want, before in zip(row_fast, row_rebuilt, row_before):
            assert got.keys() == want.keys()
            joined += sum(not np.array_equal(got[p][0], before[p][0]) for p in got if p in before)
            for p in want:
                for x, y in zip(got[p], want[p]):
                    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    # rows 0 and 1 (2 heads each) bring a token: with a free slot nothing joins; with few unprotected
    # tokens at least one (row, head) has no eligible pair and evicts instead; otherwise all four join
    assert joined == (0 if filled < capacity else 4) if options["protect"] < 22 else joined < 4


def test_kvmerger_excluded_layers_evict_instead():
    spec = kvjax.CacheSpec(num_layers=6, kv_heads=1, head_dim=8)
    for options in (dict(num_layers=6), {}):  # the layer count comes from the model unless given
        layers = kvjax.policies.resolve(kvjax.policies.make("kvmerger", capacity=16, **options), spec)
        assert [p.name for p in layers] == ["h2o", "h2o", "kvmerger", "kvmerger", "kvmerger", "h2o"]
    with pytest.raises(ValueError, match="made for num_layers=4, the model has 6"):
        kvjax.policies.resolve(kvjax.policies.make("kvmerger", capacity=16, num_layers=4), spec)
    with pytest.raises(ValueError, match="capacity >= 6"):
        kvjax.policies.make("kvmerger", capacity=5, protect=4, window=1, exclude_layers=())


def np_bct(cache, tokens, capacity, sinks, window):
    """Sequential float64 BCT: free slot, else merge the newest movable token into its most similar movable slot."""
    slots = [dict(s) for s in cache]
    for t in tokens:
        if len(slots) < capacity:
            slots.append(dict(t))
            continue
        cands = slots + [dict(t)]
        movable = [i for i, s in enumerate(cands) if s["pos"] >= sinks and s["pos"] <= t["pos"] - window]
        victim = max(movable, key=lambda i: cands[i]["pos"])
        kv = cands[victim]["k"]
        cos = lambda a: a @ kv / np.linalg.norm(a) / np.linalg.norm(kv)  # noqa: E731
        target = max((i for i in movable if i != victim), key=lambda i: (cos(cands[i]["k"]), -i))
        a, b = cands[target], cands[victim]
        n = a["n"] + b["n"]
        merged = dict(k=(a["n"] * a["k"] + b["n"] * b["k"]) / n, v=(a["n"] * a["v"] + b["n"] * b["v"]) / n, pos=max(a["pos"], b["pos"]), n=n)
        rest = [s for i, s in enumerate(cands) if i not in (target, victim)]
        slots = rest + [merged]
    return slots


@pytest.mark.parametrize("window", [0, 2])
def test_bct_matches_sequential_reference(window):
    capacity, sinks, d = 6, 1, 5
    rng = np.random.default_rng(window)
    toks = [dict(k=rng.normal(size=d), v=rng.normal(size=d), pos=p, n=1.0) for p in range(14)]
    want = {s["pos"]: s for s in np_bct([], toks, capacity, sinks, window)}
    policy = kvjax.policies.make("bct", capacity=capacity, sinks=sinks, window=window)
    arr = lambda name: jnp.asarray(np.array([t[name] for t in toks]))[None, None]  # noqa: E731
    empty = dict(k=jnp.zeros((1, 1, capacity, d)), v=jnp.zeros((1, 1, capacity, d)), pos=jnp.full((1, 1, capacity), -1),
                 valid=jnp.zeros((1, 1, capacity), bool), score=jnp.zeros((1, 1, capacity)))
    new = dict(k=arr("k").astype(jnp.float32), v=arr("v").astype(jnp.float32), pos=arr("pos"), valid=jnp.ones((1, 1, 14), bool),
               score=jnp.ones((1, 1, 14)))
    f = {n: jnp.concatenate([empty[n], new[n]], 2) for n in empty}
    got = {n: np.asarray(x[0, 0]) for n, x in policy.merge(f, None, None, capacity).items()}
    assert got["valid"].all() and sorted(got["pos"].tolist()) == sorted(want)
    for s in range(capacity):
        ref = want[int(got["pos"][s])]
        np.testing.assert_allclose(got["k"][s], ref["k"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["v"][s], ref["v"], rtol=1e-5, atol=1e-6)
        assert got["score"][s] == ref["n"]
    assert got["score"].sum() == 14  # every token is counted in exactly one slot: nothing dropped
    for p in list(range(sinks)) + list(range(14 - window, 14)):
        assert want[p]["n"] == 1  # sinks and the recent window are never merged


def test_merge_profile_measures_neighbour_similarity():
    """KVMerger's offline profile: the mergeable fraction per layer from the full cache's keys,
    checked against numpy on the keys themselves; it feeds plan_capacity as per-layer shares."""
    from flax import nnx

    from kvjax.calibrate import merge_profile
    from models import Llama, LlamaConfig

    model = Llama(LlamaConfig.tiny(num_layers=3), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 1, 256)
    loose, strict = merge_profile(model, tokens, threshold=-1.0, chunk_size=16), merge_profile(model, tokens, threshold=0.3, chunk_size=16)
    assert loose.mergeable == (1.0, 1.0, 1.0)  # every cosine exceeds -1
    cache = kvjax.prefill(model, tokens, jnp.ones_like(tokens, bool), model.cache_spec().init(kvjax.policies.make("full", capacity=40), 2),
                          jax.random.key(0), chunk_size=8)[1]
    for layer, got in enumerate(strict.mergeable):
        lc = jax.tree.map(np.asarray, cache.layers[layer])
        k = np.take_along_axis(lc.k, np.argsort(lc.pos, -1)[..., None], 2).astype(np.float64)
        cos = (k[..., 1:, :] * k[..., :-1, :]).sum(-1) / np.linalg.norm(k[..., 1:, :], axis=-1) / np.linalg.norm(k[..., :-1, :], axis=-1)
        assert abs(got - (cos > 0.3).mean()) < 1e-6
    assert 0 < sum(strict.mergeable) < 3
    plan = kvjax.plan_capacity(model, tokens=64, policy="kvmerger", per_layer=strict.keep, exclude_layers=())
    assert sum(plan.slots) == 3 * 64 and plan.nbytes == plan.init().nbytes


def test_neighbour_cosine_matches_float64():
    """Each row's cosine with the next, against float64; a zero row gives 0 with both neighbours."""
    from kvjax.policies.merging import neighbour_cosine

    x = np.array(jax.random.normal(jax.random.key(3), (2, 3, 9, 64)), np.float32)
    x[1, 2, 4] = 0.0
    ref = x.astype(np.float64)
    dots = (ref[..., :-1, :] * ref[..., 1:, :]).sum(-1)
    norms = np.linalg.norm(ref[..., :-1, :], axis=-1) * np.linalg.norm(ref[..., 1:, :], axis=-1)
    want = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    got = np.asarray(jax.jit(neighbour_cosine)(x))
    assert got.shape == (2, 3, 8)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[1, 2, 3] == 0.0 and got[1, 2, 4] == 0.0
