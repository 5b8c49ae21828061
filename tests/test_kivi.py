"""KIVI's 4-/2-bit slots (`kvjax.quant.GroupedFormat`, `kvjax.policies.Kivi`; arXiv 2402.02750):
round-trip error against a float64 reference, the newest tokens read exactly, older ones as
quantized when written, untouched groups keep their bits, and every policy runs on them."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.policies import Kivi, Quantized
from kvjax.policies.kivi import read
from kvjax.quant import slot_format
from models import Llama, LlamaConfig

GROUPED = ["int4", "int2"]


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


def groups(seed=0, n=48, size=32):
    """Groups of very different offsets and ranges (1e-3 to 1e3), one constant, in float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size)) * 10.0 ** rng.uniform(-3, 3, (n, 1)) + rng.uniform(-5, 5, (n, 1))
    x[0] = 1.5
    return x.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("name", GROUPED)
def test_round_trip_is_within_half_a_step(name):
    """Every value comes back within half its group's step (the range over 2^bits - 1), plus the
    float16 rounding of the stored zero point; the group's minimum and maximum are on the grid."""
    fmt = slot_format(name)
    x64 = groups()
    codes, scale, zero = fmt.quantize(jnp.asarray(x64, jnp.float32))
    assert codes.dtype == fmt.dtype and scale.dtype == zero.dtype == jnp.float16
    back = np.asarray(fmt.dequantize(codes, scale, zero, jnp.float32), np.float64)
    step = (x64.max(1) - x64.min(1)) / fmt.levels
    slack = 2.0**-10 * np.abs(x64).max(1) + 2.0**-10 * step * fmt.levels  # float16 zero point and scale
    err = np.abs(back - x64)
    assert (err <= (step / 2 + slack)[:, None]).all(), float((err / (step / 2 + slack)[:, None]).max())
    assert (err[1:] > 0.25 * step[1:, None]).any()  # it really rounds to 2^bits levels
    np.testing.assert_allclose(back[0], 1.5, rtol=1e-3)  # a constant group comes back
    assert set(np.unique(np.asarray(codes, np.int32))) <= set(range(fmt.levels + 1))


@pytest.mark.parametrize("name", GROUPED)
def test_requantizing_gives_the_stored_codes_back(name):
    """Dequantized and quantized again, a group keeps its codes and stats, so a key group that is
    quantized anew because one of its slots changed does not drift. (A group whose range is below
    float16's resolution of its offset, under 2^-11 of it, can move by a code.)"""
    fmt = slot_format(name)
    x = groups(1)
    x = x[np.ptp(x, 1) > 1e-2 * np.abs(x).max(1)]
    codes, scale, zero = fmt.quantize(jnp.asarray(x, jnp.float32))
    again = fmt.quantize(fmt.dequantize(codes, scale, zero, jnp.float32))
    for a, b in zip(again, (codes, scale, zero)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def run(model, policy, tokens, chunk=16):
    return kvjax.evaluate.stream_nll(model, tokens, policy=policy, chunk_size=chunk, impl="xla", with_cache=True)


@pytest.mark.parametrize("name", GROUPED)
def test_newest_tokens_read_exactly_and_older_as_quantized_when_written(model, name):
    """Layer 0's keys and values come from the embeddings alone, so the float cache holds their exact
    values. Over a full int4/int2 cache: the newest `residual` tokens read back exactly; every
    older key is within half a step of its exact value on its group's grid, which spans the
    group's exact keys per channel (KIVI's per-channel range); every older value is its
    per-token quantization."""
    fmt = slot_format(name)
    tokens = jax.random.randint(jax.random.key(1), (2, 80), 1, 256)
    _, exact = run(model, kvjax.policies.make("full", capacity=96), tokens)
    _, stored = run(model, kvjax.policies.make("full", capacity=96, kv_dtype=name), tokens)
    f, q = exact.layers[0], stored.layers[0]
    assert q.k.dtype == fmt.dtype and q.groups.k_scale.shape == (2, 2, 96 // fmt.group, 16)
    view = read(fmt, q, stored.state[0], stored.seen, jnp.float32)
    pos, valid = np.asarray(q.pos), np.asarray(q.valid)
    recent = valid & (pos >= 80 - fmt.residual)
    for field in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(getattr(view, field))[recent], np.asarray(getattr(f, field))[recent])
    old = valid & ~recent
    assert old.sum() > 0
    b, h, c, d = f.k.shape
    per_slot = lambda stat: np.repeat(np.asarray(stat, np.float64), fmt.group, axis=2)  # noqa: E731  [B H C D]
    scale, zero = per_slot(q.groups.k_scale), per_slot(q.groups.k_zero)
    exact_k, seen_k = np.asarray(f.k, np.float64), np.asarray(view.k, np.float64)
    slack = 2.0**-10 * (np.abs(zero) + fmt.levels * scale)  # float16 stats
    assert (np.abs(seen_k - exact_k)[old] <= (scale / 2 + slack)[old]).all()
    assert ((exact_k >= zero - slack) & (exact_k <= zero + fmt.levels * scale + slack))[valid].all()
    assert np.abs(seen_k - exact_k)[old].max() > 0  # they really are quantized
    values = np.asarray(fmt.dequantize(*fmt.quantize(f.v.reshape(b, h, c, 1, d)), jnp.float32)).reshape(b, h, c, d)
    np.testing.assert_allclose(np.asarray(view.v)[old], values[old], rtol=1e-6, atol=1e-6)


def test_narrower_formats_move_the_nll_more(model):
    """Teacher-forced NLL over a full cache (only storage differs): int8 < int4 < int2 in mean shift,
    and KIVI's 2 bits stay within 5% of the NLL thanks to per-channel keys and the exact residual."""
    tokens = jax.random.randint(jax.random.key(6), (1, 96), 1, 256)
    nll = {kv: np.asarray(run(model, kvjax.policies.make("full", capacity=96, kv_dtype=kv), tokens)[0]) for kv in (None, "int8", "int4", "int2")}
    shift = {kv: np.abs(nll[kv] - nll[None]).mean() for kv in ("int8", "int4", "int2")}
    assert 0 < shift["int8"] < shift["int4"] < shift["int2"] < 0.05 * np.abs(nll[None]).mean(), shift


def test_key_groups_and_values_a_policy_leaves_alone_keep_their_bits(model):
    """A new turn over an int4 H2O cache: a key group none of whose slots changed keeps its codes and
    stats; a value row whose slot still holds the same token keeps its codes and stats."""
    prompt = jax.random.randint(jax.random.key(5), (2, 70), 1, 256)
    policy = kvjax.policies.make("h2o", capacity=64, kv_dtype="int4")
    before = kvjax.generate(model, prompt, policy=policy, max_new_tokens=4, impl="xla").cache
    fields = ("pos", "valid", "k", "v")
    kept = [({f: np.asarray(getattr(lc, f)).astype(np.int32) for f in fields}, jax.tree.map(np.asarray, lc.groups)) for lc in before.layers]
    after = kvjax.generate(model, prompt[:, :2], cache=before, max_new_tokens=2, impl="xla").cache  # `before` is donated
    kept_groups = kept_rows = 0
    for (a, stats), b in zip(kept, after.layers):
        same = a["pos"] == np.asarray(b.pos)
        rows = same & (a["valid"] > 0)
        kept_rows += rows.sum()
        np.testing.assert_array_equal(a["v"][rows], np.asarray(b.v, np.int32)[rows])
        np.testing.assert_array_equal(stats.v_scale[rows], np.asarray(b.groups.v_scale)[rows])
        whole = same.reshape(*same.shape[:2], -1, 32).all(-1)
        kept_groups += whole.sum()
        codes = lambda k: k.reshape(*same.shape[:2], -1, 32, k.shape[-1])  # noqa: E731
        np.testing.assert_array_equal(codes(a["k"])[whole], codes(np.asarray(b.k, np.int32))[whole])
        np.testing.assert_array_equal(stats.k_zero[whole], np.asarray(b.groups.k_zero)[whole])
    assert kept_rows > 0 and kept_groups > 0


@pytest.mark.parametrize(("name", "options"), [("h2o", {}), ("snapkv", dict(window=2, kernel=3)), ("kvmerger", {}), ("bct", {}),
                                               ("dmc", {}), ("pod", dict(capacity=48, sinks=8, window=24)), ("streaming_llm", dict(rerotate=True))])
def test_every_kind_of_policy_runs_on_kivi_slots(model, name, options):
    """Scorer, merging, learned and re-rotating policies keep the same slots as in float32 give or
    take quantization: the int4 cache holds the same number of tokens in under a quarter of the
    slot bytes, and its NLL stays near the float cache's."""
    prompt = jax.random.randint(jax.random.key(7), (2, 72), 1, 256)
    with pytest.warns(UserWarning, match="retrofit") if name == "dmc" else contextlib.nullcontext():
        results = [run(model, kvjax.policies.make(name, kv_dtype=kv, **{"capacity": 32, **options}), prompt) for kv in (None, "int4")]
    (nll, plain), (nll4, kivi) = results
    assert {lc.k.dtype for lc in kivi.layers} == {jnp.dtype(jnp.uint4)}
    np.testing.assert_array_equal(np.asarray(plain.lengths()), np.asarray(kivi.lengths()))
    assert np.abs(np.asarray(nll4) - np.asarray(nll)).mean() < 0.05 * np.abs(np.asarray(nll)).mean()
    slot_bytes = lambda lc: sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves((lc.k, lc.v, lc.groups)))  # noqa: E731
    assert 4 * sum(map(slot_bytes, kivi.layers)) < sum(map(slot_bytes, plain.layers))  # packed codes, stats included


def test_kivi_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="multiple of the group"):
        kvjax.generate(model, [[1, 2, 3]], policy=kvjax.policies.make("h2o", capacity=40, kv_dtype="int4"), max_new_tokens=1)
    with pytest.raises(ValueError, match="stored_as"):
        Kivi(kvjax.policies.make("h2o", capacity=32), "int8")
    with pytest.raises(ValueError, match="KIVI's formats"):
        Quantized(kvjax.policies.make("h2o", capacity=32), "int4")
    with pytest.raises(ValueError, match="tokens=40 is not a multiple of 32"):
        kvjax.plan_capacity(model, tokens=40, policy="h2o", kv_dtype="int2")
    with pytest.warns(UserWarning, match="retrofit"):
        cache = kvjax.generate(model, [[1, 2, 3]], policy=kvjax.policies.make("dmc", capacity=32, kv_dtype="int4"), max_new_tokens=1).cache
    with pytest.raises(ValueError, match="DMC's accumulators"):
        cache.with_room(8)


def test_kvpress_protocol_grows_kivi_caches_by_whole_groups(model):
    """Compress a context once, then append a question and answer uncompressed: `with_room(8)` adds a
    whole group (32 slots), the stored slots and stats are unchanged, and the answer equals the one
    from a cache that had the room from the start (a full cache of capacity 64 over 30 tokens)."""
    context = jax.random.randint(jax.random.key(2), (1, 30), 1, 256)
    question = jax.random.randint(jax.random.key(3), (1, 5), 1, 256)
    small = kvjax.generate(model, context, policy=kvjax.policies.make("full", capacity=32, kv_dtype="int4"), max_new_tokens=1, impl="xla").cache
    before = jax.tree.map(np.asarray, small.layers)
    grown = small.with_room(8)
    assert grown.slots == (64, 64) and grown.policies[0].capacity == 64
    for a, b in zip(before, grown.layers):
        assert b.groups.k_scale.shape[2] == 2 and b.groups.v_scale.shape[2] == 64
        np.testing.assert_array_equal(np.asarray(a.k, np.int32), np.asarray(b.k[:, :, :32], np.int32))
        np.testing.assert_array_equal(a.groups.k_zero, np.asarray(b.groups.k_zero[:, :, :1]))
        assert not np.asarray(b.valid[:, :, 32:]).any()
    wide = kvjax.generate(model, context, policy=kvjax.policies.make("full", capacity=64, kv_dtype="int4"), max_new_tokens=1, impl="xla").cache
    answers = [kvjax.generate(model, question, cache=c, max_new_tokens=4, impl="xla").tokens for c in (grown, wide)]
    np.testing.assert_array_equal(*map(np.asarray, answers))
