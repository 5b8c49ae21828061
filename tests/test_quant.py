"""Quantized slots (`kvjax.quant`, `kvjax.policies.Quantized`): round-trip error against a float64
reference, bit-identity of float32 storage, tokens quantized where they are written, and plans
whose bytes are the allocated bytes for every format."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.plan import plan_capacity, slot_bytes
from kvjax.policies import Quantized
from kvjax.policies.scorer import keeps_slots_as_stored
from kvjax.quant import FORMATS, slot_format
from models import Llama, LlamaConfig
from tests.test_policies import make_policy

SCALED = ["int8", "fp8"]
PER_SLOT = [name for name, f in FORMATS.items() if not f.grouped]  # KIVI's grouped formats: tests/test_kivi.py


@pytest.fixture(scope="module")
def model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


def vectors(seed=0, rows=64, dim=32):
    """Rows of very different magnitudes (1e-3 to 1e3), one all zero, in float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * 10.0 ** rng.uniform(-3, 3, (rows, 1))
    x[0] = 0.0
    return x


def half_step(name: str, x64, scale64):
    """Half the spacing of the format's grid around each value: the worst round-to-nearest error."""
    mag = np.abs(x64)
    if name == "int8":
        return np.broadcast_to(scale64[:, None] / 2, x64.shape)
    if name == "fp8":  # e4m3: 3 mantissa bits; subnormal spacing 2^-9 (in units of the scale)
        return np.maximum(2.0 ** (np.floor(np.log2(np.maximum(mag, 1e-300) / scale64[:, None])) - 4), 2.0**-10) * scale64[:, None]
    if name == "bfloat16":
        return 2.0 ** (np.floor(np.log2(np.maximum(mag, 1e-300))) - 8)
    return np.zeros_like(x64)


@pytest.mark.parametrize("name", PER_SLOT)
def test_round_trip_is_within_half_a_step(name):
    fmt = slot_format(name)
    x64 = vectors().astype(np.float32).astype(np.float64)  # the f32 values a model hands over
    data, scale = fmt.quantize(jnp.asarray(x64, jnp.float32))
    assert data.dtype == fmt.dtype and (scale is None) == (not fmt.scaled)
    scale64 = np.ones(len(x64)) if scale is None else np.asarray(scale, np.float64)
    back = np.asarray(data.astype(jnp.float32), np.float64) * scale64[:, None]
    err, bound = np.abs(back - x64), half_step(name, x64, scale64)
    assert (err <= bound * (1 + 1e-5) + 1e-30).all(), float((err / np.maximum(bound, 1e-30)).max())
    assert not back[0].any()  # a zero vector stays zero
    if name != "float32":
        assert (err > 0.25 * bound).any()  # it really rounds to the format's grid
    np.testing.assert_allclose(np.asarray(fmt.dequantize(data, scale, jnp.float32)), back, rtol=1e-6)


@pytest.mark.parametrize("name", SCALED)
def test_requantizing_gives_the_stored_slot_back(name):
    """A slot the policy leaves alone is dequantized for it and quantized again: nothing drifts."""
    fmt = slot_format(name)
    data, scale = fmt.quantize(jnp.asarray(vectors(1), jnp.float32))
    again, scale2 = fmt.quantize(fmt.dequantize(data, scale, jnp.float32))
    np.testing.assert_array_equal(np.asarray(again.astype(jnp.float32)), np.asarray(data.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(scale2), np.asarray(scale), rtol=1e-6)


def generated(model, policy, prompt, cache=None, new=4, impl="xla"):
    return kvjax.generate(model, prompt, policy=policy if cache is None else None, cache=cache, max_new_tokens=new, impl=impl)


@pytest.mark.parametrize("name", ["h2o", "kvmerger", "pod", "dmc", "window"])
def test_float32_storage_is_bit_identical(model, name):
    """Quantized(policy, "float32") on a float32 model is the policy itself, bit for bit."""
    prompt = jax.random.randint(jax.random.key(3), (2, 21), 1, 256)
    policy = make_policy(name, capacity=12, rerotate=name == "window")
    plain, wrapped = generated(model, policy, prompt), generated(model, Quantized(policy, "float32"), prompt)
    np.testing.assert_array_equal(np.asarray(plain.tokens), np.asarray(wrapped.tokens))
    for a, b in zip(plain.cache.layers, wrapped.cache.layers):
        assert b.k_scale is None and b.v_scale is None
        for field in ("k", "v", "pos", "valid", "score"):
            np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=field)


@pytest.mark.parametrize("name", SCALED)
def test_tokens_are_quantized_where_they_are_written(model, name):
    """Layer 0's keys and values come from the embeddings alone, so its stored slots must equal
    the format's quantization of the float cache's slots exactly."""
    fmt = slot_format(name)
    prompt = jax.random.randint(jax.random.key(4), (1, 19), 1, 256)
    float_layer = generated(model, kvjax.policies.make("full", capacity=32), prompt, new=1).cache.layers[0]
    stored = generated(model, kvjax.policies.make("full", capacity=32, kv_dtype=name), prompt, new=1).cache.layers[0]
    assert stored.k.dtype == fmt.dtype and stored.k_scale.shape == stored.pos.shape
    np.testing.assert_array_equal(np.asarray(stored.pos), np.asarray(float_layer.pos))
    for field in ("k", "v"):
        data, scale = fmt.quantize(getattr(float_layer, field))
        valid = np.asarray(stored.valid)
        np.testing.assert_array_equal(np.asarray(getattr(stored, field).astype(jnp.float32))[valid], np.asarray(data.astype(jnp.float32))[valid])
        np.testing.assert_array_equal(np.asarray(getattr(stored, f"{field}_scale"))[valid], np.asarray(scale)[valid])


def test_slots_a_policy_keeps_keep_their_bits(model):
    """A new turn over an int8 H2O cache: every slot still holding the same token has the same data and scale."""
    prompt = jax.random.randint(jax.random.key(5), (2, 21), 1, 256)
    before = generated(model, kvjax.policies.make("h2o", capacity=12, kv_dtype="int8"), prompt).cache
    kept = [(np.asarray(lc.pos), np.asarray(lc.k), np.asarray(lc.k_scale), np.asarray(lc.v), np.asarray(lc.v_scale)) for lc in before.layers]
    after = generated(model, None, prompt[:, :3], cache=before, new=2).cache
    unchanged = 0
    for (pos, k, ks, v, vs), lc in zip(kept, after.layers):
        same = (pos == np.asarray(lc.pos)) & (pos >= 0)
        unchanged += same.sum()
        np.testing.assert_array_equal(k[same], np.asarray(lc.k)[same])
        np.testing.assert_array_equal(ks[same], np.asarray(lc.k_scale)[same])
        np.testing.assert_array_equal(v[same], np.asarray(lc.v)[same])
        np.testing.assert_array_equal(vs[same], np.asarray(lc.v_scale)[same])
    assert unchanged > 0


def test_quantized_caches_track_the_float_cache(model):
    """Teacher-forced NLL over a full-capacity cache (no eviction, so only storage differs): the
    mean shift grows as the format's precision falls, bfloat16 (8 significant bits) < int8 (7 bits
    of magnitude) < fp8 (4), and stays within 2% of the NLL."""
    tokens = jax.random.randint(jax.random.key(6), (1, 64), 1, 256)
    nll = {kv: np.asarray(kvjax.evaluate.stream_nll(model, tokens, policy=kvjax.policies.make("full", capacity=64, kv_dtype=kv),
                                                    chunk_size=16, impl="xla")) for kv in (None, "bfloat16", "int8", "fp8")}
    shift = {kv: np.abs(nll[kv] - nll[None]).mean() for kv in ("bfloat16", "int8", "fp8")}
    assert 0 < shift["bfloat16"] < shift["int8"] < shift["fp8"] < 0.02 * np.abs(nll[None]).mean(), shift


def test_pallas_and_xla_agree_on_an_int8_cache(model):
    prompt = jax.random.randint(jax.random.key(7), (2, 21), 1, 256)
    policy = kvjax.policies.make("snapkv", capacity=12, window=2, kernel=3, kv_dtype="int8")
    xla, pallas = generated(model, policy, prompt, impl="xla"), generated(model, policy, prompt, impl="pallas")
    np.testing.assert_array_equal(np.asarray(xla.tokens), np.asarray(pallas.tokens))
    for a, b in zip(xla.cache.layers, pallas.cache.layers):
        np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.pos))
        np.testing.assert_allclose(np.asarray(a.k_scale), np.asarray(b.k_scale), rtol=1e-5)
        assert np.abs(np.asarray(a.k, np.int32) - np.asarray(b.k, np.int32)).max() <= 1  # a rounding tie at most


class OnView(Quantized):
    """The wrapper's general path for any policy: the step on a dequantized view, quantized back."""

    def update(self, cache, layer, q, k, v, step, attn):
        return self.update_on_view(cache, layer, q, k, v, step, attn)


NATIVE = [("full", {}), ("h2o", {}), ("tova", {}), ("snapkv", dict(window=2, kernel=3)), ("knorm", {}), ("streaming_llm", dict(sinks=2))]


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", "bfloat16"])
@pytest.mark.parametrize(("name", "options"), NATIVE)
def test_scorer_policies_keep_narrow_slots_as_the_view_path_does(model, name, options, kv_dtype):
    """Scorer policies run with their slots narrow (attention reads them as stored; only kept
    chunk tokens are quantized); the result equals the general path's, which dequantizes the
    layer, runs the policy and quantizes it back: same NLL to float tolerance, same kept tokens."""
    inner = kvjax.policies.make(name, capacity=64 if name == "full" else 12, **options)
    assert keeps_slots_as_stored(inner)
    tokens = jax.random.randint(jax.random.key(8), (2, 40), 1, 256)
    results = []
    for policy in (Quantized(inner, kv_dtype), OnView(inner, kv_dtype)):
        nll, cache = kvjax.evaluate.stream_nll(model, tokens, policy=policy, chunk_size=8, impl="xla", with_cache=True)
        results.append((np.asarray(nll), cache))
    (nll, native), (nll_view, view) = results
    np.testing.assert_allclose(nll, nll_view, atol=2e-4)
    for a, b in zip(native.layers, view.layers):
        assert a.k.dtype == b.k.dtype == slot_format(kv_dtype).dtype
        np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.pos))
        valid = np.asarray(a.valid)
        for field in ("k", "v"):
            np.testing.assert_allclose(np.asarray(getattr(a, field).astype(jnp.float32))[valid],
                                       np.asarray(getattr(b, field).astype(jnp.float32))[valid], atol=1.0, rtol=2e-2)


def test_only_the_scorer_tier_keeps_slots_as_stored():
    assert not any(keeps_slots_as_stored(kvjax.policies.make(n, capacity=64)) for n in ("kvmerger", "bct", "pod", "dmc"))
    assert not keeps_slots_as_stored(kvjax.policies.make("streaming_llm", capacity=16, rerotate=True))


@pytest.mark.parametrize("name", ["dmc", "pod"])
def test_kv_dtype_is_one_option_of_generate_and_evaluate(model, name):
    """`generate(..., kv_dtype=)` and `stream_nll(..., kv_dtype=)` are `make(..., kv_dtype=)`: the same
    tokens, NLL and narrow cache, for the policies that do their own thing too."""
    prompt = jax.random.randint(jax.random.key(9), (2, 21), 1, 256)
    options = dict(capacity=40, sinks=2, window=4) if name == "pod" else dict(capacity=12)
    with contextlib.nullcontext() if name != "dmc" else pytest.warns(UserWarning, match="retrofit"):
        plain = kvjax.policies.make(name, **options)
        by_option = kvjax.generate(model, prompt, policy=plain, max_new_tokens=4, impl="xla", kv_dtype="int8")
        by_make = generated(model, kvjax.policies.make(name, kv_dtype="int8", **options), prompt)
        nll = [np.asarray(kvjax.evaluate.stream_nll(model, prompt, policy=p, chunk_size=8, impl="xla", kv_dtype=kv))
               for p, kv in ((plain, "int8"), (Quantized(plain, "int8"), None))]
    np.testing.assert_array_equal(np.asarray(by_option.tokens), np.asarray(by_make.tokens))
    assert by_option.cache.layers[0].k.dtype == jnp.int8
    np.testing.assert_array_equal(*nll)


def test_kv_dtype_cannot_change_a_format(model):
    policy = kvjax.policies.make("h2o", capacity=12, kv_dtype="int8")
    with pytest.raises(ValueError, match="already stores its slots as int8"):
        kvjax.policies.stored_as(policy, "fp8")
    out = generated(model, policy, jax.random.randint(jax.random.key(9), (1, 9), 1, 256))
    with pytest.raises(ValueError, match="a cache keeps its format"):
        kvjax.generate(model, [[1, 2]], cache=out.cache, max_new_tokens=1, kv_dtype="fp8")


CFG = LlamaConfig.tiny(num_layers=4)
SLIDING = LlamaConfig.tiny(num_layers=4, sliding_window=8, layer_types=("sliding_attention", "full_attention") * 2)


@pytest.mark.parametrize("kv_dtype", list(FORMATS))
@pytest.mark.parametrize("policy,cfg", [("h2o", CFG), ("pod", CFG), ("dmc", CFG), ("snapkv", SLIDING)])
def test_plan_bytes_are_the_allocated_bytes(kv_dtype, policy, cfg):
    """Scales counted: what the plan promises is what `init` allocates, and int8 buys about
    (2 D 4 + 9) / (2 D + 8 + 9) times the slots of float32 for a scorer policy (KIVI's formats:
    codes, group stats and the residual ring counted; whole groups of slots)."""
    budget = 2**20
    if slot_format(kv_dtype).grouped and policy in ("pod", "snapkv"):  # POD's own slots, sliding layers: not whole groups
        with pytest.raises(ValueError, match="multiple of the group"):
            plan_capacity(cfg, budget, policy=policy, kv_dtype=kv_dtype, batch=2)
        return
    with pytest.warns(UserWarning, match="never trained") if policy == "dmc" else contextlib.nullcontext():
        plan = plan_capacity(cfg, budget, policy=policy, kv_dtype=kv_dtype, batch=2)
        cache = plan.init()
    assert cache.nbytes == plan.nbytes <= budget
    assert {lc.k.dtype for lc in cache.layers} == {slot_format(kv_dtype).dtype}
    if policy == "h2o":
        f32 = plan_capacity(cfg, budget, policy=policy, batch=2)
        spec = cfg.cache_spec()
        expected = slot_bytes(spec, 2) / slot_bytes(spec, 2, slot_format(kv_dtype))
        assert abs(plan.slots[0] / f32.slots[0] - expected) < (0.1 if slot_format(kv_dtype).grouped else 0.02) * expected
        assert plan.slots[0] % slot_format(kv_dtype).slot_multiple == 0


def test_format_errors_name_the_fix():
    with pytest.raises(ValueError, match="int8, fp8"):
        kvjax.policies.make("h2o", capacity=8, kv_dtype="int3")
    with pytest.raises(TypeError, match="already stored as int8"):
        Quantized(kvjax.policies.make("h2o", capacity=8, kv_dtype="int8"), "fp8")


def test_auto_format_is_the_narrowest_within_the_nll_threshold(model):
    """kv_dtype="auto" measures each format's NLL shift on the calibration text and takes the fewest
    bytes per slot within the threshold: thresholds between the measured shifts pick each format in turn."""
    calibration = jax.random.randint(jax.random.key(8), (1, 64), 1, 256)
    shifts = kvjax.calibrate.format_shifts(model, calibration, chunk_size=16, impl="xla")
    # as measured by the float cache tests; KIVI's exact residual (half of these 64 tokens) puts int4 below fp8 here
    assert shifts["bfloat16"] < shifts["int8"] < shifts["int4"] < shifts["int2"] and shifts["fp8"] < shifts["int2"], shifts

    def plan(max_shift):
        return plan_capacity(model, 2**18, policy="h2o", kv_dtype="auto", calibration=calibration, max_nll_shift=max_shift,
                             calibration_chunk=16)

    assert plan(shifts["int2"] * 1.01).kv_dtype == "int2" and plan(shifts["int4"] * 1.01).kv_dtype == "int4"  # KIVI's: fewest bytes
    assert plan(shifts["int8"] * 1.01).kv_dtype == "int8"  # fp8 costs as many bytes as int8: the smaller shift (or fp8 is over)
    between = plan((shifts["bfloat16"] + shifts["int8"]) / 2)
    assert between.kv_dtype == "bfloat16" and between.slots == plan_capacity(model, 2**18, policy="h2o", kv_dtype="bfloat16").slots
    none = plan(shifts["bfloat16"] / 2)
    assert none.kv_dtype == "float32" and none.slots == plan_capacity(model, 2**18, policy="h2o").slots
    with pytest.raises(ValueError, match="calibration=<token ids>"):
        plan_capacity(model.cfg, 2**18, policy="h2o", kv_dtype="auto")
