"""Pallas kernels (GPU and TPU variants, interpreted on CPU) against the jnp reference.

Interpret mode fills outputs and out-of-bounds block padding with NaN, so a
finite result that matches the reference also shows every output was written
and no padding leaked in.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.attention import attention, resolve_impl
from kvjax.quant import FORMATS
from models import Llama, LlamaConfig
from pallas_kernels import cache_attention, cache_attention_reference, cache_attention_xla, reference

BACKENDS = ["gpu", "tpu"]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def masks(kind: str, rng, shape) -> np.ndarray:
    """Ragged cache masks: holes everywhere, an empty head, one valid slot, all valid."""
    valid = rng.random(shape) < 0.5
    if kind == "all":
        valid[:] = True
    elif kind == "single":
        valid[:] = False
        valid[..., rng.integers(shape[-1])] = True
    elif kind == "empty_head":
        valid[0, 0] = False
    return valid


def inputs(seed, *, batch=2, kv_heads=2, group=3, chunk=1, capacity=37, head_dim=16, mask="holes", dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    rows = chunk * group
    new_valid = np.ones((batch, chunk), bool)
    if chunk > 2:
        new_valid[-1, :2] = False  # left padding in the last row
    args = (
        normal(batch, kv_heads, rows, head_dim),
        normal(batch, kv_heads, capacity, head_dim), normal(batch, kv_heads, capacity, head_dim),
        jnp.asarray(masks(mask, rng, (batch, kv_heads, capacity))),
        normal(batch, kv_heads, chunk, head_dim), normal(batch, kv_heads, chunk, head_dim),
        jnp.asarray(new_valid),
    )
    extras = dict(
        group=group, scale=head_dim**-0.5,
        stat_weights=jnp.asarray(rng.random((batch, chunk)), jnp.float32),
        cache_pos=jnp.asarray(rng.integers(0, 64, (batch, kv_heads, capacity)), jnp.int32),
        q_pos=jnp.broadcast_to(64 + jnp.arange(chunk), (batch, chunk)).astype(jnp.int32),
    )
    return args, extras


def relative_error(got, want) -> float:
    """max |got - want| / max(1, max |want|); inf if the kernel left NaN (unwritten or poisoned) values."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return np.inf
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def assert_close(got, want, tol):
    err = relative_error(got, want)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def kernel_errors(backend, args, extras, interpret=True, **blocks) -> dict[str, float]:
    """Relative errors of the kernel's output, lse and per-slot mass against the reference."""
    out, lse, mass = cache_attention(*args, **extras, backend=backend, interpret=interpret, **blocks)
    ref_out, ref_lse, ref_mass = cache_attention_reference(*args, **extras)
    seen = np.isfinite(ref_lse)
    errors = dict(
        dtype=0.0 if out.dtype == ref_out.dtype == args[0].dtype else np.inf,
        out=relative_error(out, ref_out),
        lse=relative_error(jnp.where(seen, lse, 0), jnp.where(seen, ref_lse, 0)),
        lse_inf=0.0 if (np.isfinite(lse) == seen).all() else np.inf,  # -inf exactly for rows that see nothing
    )
    if "stat_weights" in extras:
        errors["mass"] = relative_error(mass, ref_mass)
    return errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("mask", ["holes", "empty_head", "single", "all"])
def test_decode_matches_reference(backend, group, mask):
    """One query token, capacity 37 (not a multiple of the block), split over the capacity
    (on GPU 10 blocks in 3 splits of a power-of-two 4 blocks: the last split runs past the end)."""
    args, extras = inputs(group, group=group, mask=mask)
    errors = kernel_errors(backend, args, extras, block_k=8 if backend == "tpu" else 4, num_splits=3)
    assert max(errors.values()) <= TOL[jnp.float32], errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_chunk_matches_reference(backend, group):
    """A chunk of 6 (with left padding) over 21 slots and itself, several row and key blocks."""
    args, extras = inputs(10 + group, group=group, chunk=6, capacity=21)
    errors = kernel_errors(backend, args, extras, block_r=8, block_k=8 if backend == "tpu" else 16)
    assert max(errors.values()) <= TOL[jnp.float32], errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 5])
def test_softcap_and_sliding_window(backend, chunk):
    args, extras = inputs(20 + chunk, chunk=chunk, capacity=29)
    errors = kernel_errors(backend, args, dict(extras, softcap=2.0, max_distance=40), block_r=8, block_k=8 if backend == "tpu" else 16)
    assert max(errors.values()) <= TOL[jnp.float32], errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 4])
def test_bfloat16_inputs_accumulate_in_f32(backend, chunk):
    args, extras = inputs(30 + chunk, chunk=chunk, group=8, dtype=jnp.bfloat16)
    errors = kernel_errors(backend, args, extras, block_r=8, block_k=8 if backend == "tpu" else 16)
    assert max(errors.values()) <= TOL[jnp.bfloat16], errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_narrow_slots_are_read_as_stored(backend, fmt, chunk, dtype):
    """int8 / fp8 slots with per-slot scales: the kernel agrees with the reference over the same
    narrow slots, and both with attention over the dequantized slots (and soft-cap, window, mass on)."""
    args, extras = inputs(50 + chunk, chunk=chunk, group=4, capacity=45, dtype=dtype)
    extras.update(softcap=5.0, max_distance=40)
    f = FORMATS[fmt]
    (kq, ks), (vq, vs) = f.quantize(args[1]), f.quantize(args[2])
    assert kq.dtype == f.dtype
    narrow, scales = (args[0], kq, vq) + args[3:], dict(k_scale=ks, v_scale=vs)
    errors = kernel_errors(backend, narrow, dict(extras, **scales), block_r=8, block_k=8 if backend == "tpu" else 16, num_splits=2)
    assert max(errors.values()) <= TOL[dtype], errors
    dequantized = (args[0], f.dequantize(kq, ks, dtype), f.dequantize(vq, vs, dtype)) + args[3:]
    (out, lse, mass), (ref_out, ref_lse, ref_mass) = (
        cache_attention_reference(*narrow, **extras, **scales), cache_attention_reference(*dequantized, **extras))
    seen = np.isfinite(ref_lse)
    for got, want in ((out, ref_out), (jnp.where(seen, lse, 0), jnp.where(seen, ref_lse, 0)), (mass, ref_mass)):
        assert_close(got, want, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocks_and_no_stats(backend):
    """Default block sizes (one block covers the tiny capacity) and the path without logits."""
    args, extras = inputs(40, capacity=50)
    del extras["stat_weights"]
    out, _, mass = cache_attention(*args, **extras, backend=backend, interpret=True)
    assert mass is None
    assert_close(out, cache_attention_reference(*args, **extras)[0], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_past_the_last_valid_slot_are_skipped(backend):
    """NaN keys/values beyond every head's last valid slot never reach the output."""
    args, extras = inputs(50, capacity=64)
    q, kc, vc, valid, *rest = args
    valid = valid.at[..., 24:].set(False)
    poison = jnp.arange(64)[:, None] >= 32  # blocks of 8/16 from slot 32 on are past the extent
    kc, vc = (jnp.where(poison, jnp.nan, x) for x in (kc, vc))
    out, _, mass = cache_attention(q, kc, vc, valid, *rest, **extras, backend=backend, interpret=True,
                                   block_k=8 if backend == "tpu" else 16, num_splits=2)
    clean = cache_attention_reference(q, jnp.nan_to_num(kc), jnp.nan_to_num(vc), valid, *rest, **extras)
    assert_close(out, clean[0], 1e-5)
    assert_close(mass, clean[2], 1e-5)


def test_unknown_backend_is_rejected():
    args, extras = inputs(0)
    with pytest.raises(ValueError, match="backend must be one of"):
        cache_attention(*args, **extras, backend="cuda")


@pytest.fixture(scope="module")
def tiny():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["full", "h2o"])
def test_generate_pallas_equals_xla(tiny, name):
    """End to end: the jitted generate loop gives the same tokens on both paths (capacity < length for h2o)."""
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 1, 256)
    policy = kvjax.policies.make(name, capacity=16 if name == "h2o" else 32)
    runs = {impl: kvjax.generate(tiny, tokens, policy=policy, max_new_tokens=8, chunk_size=8, impl=impl) for impl in ("xla", "pallas")}
    np.testing.assert_array_equal(runs["pallas"].tokens, runs["xla"].tokens)
    for a, b in zip(runs["pallas"].cache.layers, runs["xla"].cache.layers):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_allclose(a.score, b.score, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_softcap_follows_the_float64_formula(impl):
    """Logits pass through c * tanh(s / c) before the softmax (Gemma 2's soft-cap), checked
    against float64 numpy, not only kernel against reference (dropping it from both would pass that)."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 1, 2, 8)) * 3  # two query heads of one group, one token; large logits
    kc, vc = rng.normal(size=(2, 1, 1, 5, 8))
    kn, vn = rng.normal(size=(2, 1, 1, 1, 8))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    fn = cache_attention if impl == "pallas" else cache_attention_reference
    out, _, _ = fn(f32(q), f32(kc), f32(vc), jnp.ones((1, 1, 5), bool), f32(kn), f32(vn), jnp.ones((1, 1), bool),
                   group=2, scale=0.5, softcap=1.5)
    keys, values = np.concatenate([kc, kn], 2)[0, 0], np.concatenate([vc, vn], 2)[0, 0]
    logits = 1.5 * np.tanh(q[0, 0] @ keys.T * 0.5 / 1.5)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out[0, 0]), (p / p.sum(-1, keepdims=True)) @ values, rtol=1e-5, atol=1e-6)


ENTRIES = {  # every public entry that runs attention, and its keyword
    "generate": kvjax.generate, "stream": kvjax.stream, "Stream": kvjax.Stream,
    "stream_nll": kvjax.evaluate.stream_nll, "perplexity": kvjax.evaluate.perplexity,
    "merge_profile": kvjax.calibrate.merge_profile, "attention_profile": kvjax.calibrate.attention_profile,
    "pod_blocks": kvjax.calibrate.pod_blocks, "prefill": kvjax.run.prefill, "forward_chunk": kvjax.run.forward_chunk,
    "scan_chunks": kvjax.run.scan_chunks, "make_step": kvjax.run.make_step, "attention": attention,
}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_entry_defaults_to_auto(name):
    assert inspect.signature(ENTRIES[name]).parameters["impl"].default == "auto"


def test_step_defaults_to_auto():
    assert {f.name: f.default for f in dataclasses.fields(kvjax.policies.base.Step)}["impl"] == "auto"


@pytest.mark.parametrize(("platform", "want"), [("tpu", "pallas"), ("gpu", "pallas"), ("cpu", "xla")])
def test_auto_resolves_by_backend(monkeypatch, platform, want):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert resolve_impl("auto") == want
    assert resolve_impl("xla") == "xla"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("triton")


def test_auto_on_cpu_runs_no_kernel(tiny):
    """The default path on this CPU is the XLA reference: no pallas_call in generate's program."""
    tokens = jnp.ones((1, 8), jnp.int32)
    cache = tiny.cache_spec().init(kvjax.policies.make("h2o", capacity=8), 1)
    graphdef, state = nnx.split(tiny)
    jaxpr = jax.make_jaxpr(lambda st, c: kvjax.run.prefill(nnx.merge(graphdef, st), tokens, tokens > 0, c, jax.random.key(0), chunk_size=4))(state, cache)
    assert "pallas_call" not in str(jaxpr)
    forced = jax.make_jaxpr(lambda st, c: kvjax.run.prefill(nnx.merge(graphdef, st), tokens, tokens > 0, c, jax.random.key(0), chunk_size=4, impl="pallas"))(state, cache)
    assert "pallas_call" in str(forced)


def test_the_mass_is_never_written_per_row():
    """The statistic costs O(keys) writes: kernel outputs are partial softmaxes ([..., rows, head_dim]
    or [..., rows, 1]) and one [B, H, 1, keys] mass per region, never [rows, keys] (the old path
    wrote the masked logits [B, H, R, N] and normalised them outside)."""
    args, extras = inputs(60, chunk=12, group=4, capacity=300, head_dim=32)  # rows 48, keys 300 + 12
    for backend in BACKENDS:
        jaxpr = jax.make_jaxpr(lambda *a: cache_attention(*a, **extras, backend=backend, interpret=True))(*args)
        shapes = [tuple(v.aval.shape) for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call" for v in eqn.outvars]
        masses = [s for s in shapes if s[-1] not in (32, 1)]
        assert len(shapes) == 2 * 3 + 2 and len(masses) == 2, shapes
        assert all(s[:3] == (2, 2, 1) for s in masses), shapes



@pytest.mark.parametrize(("fill", "option"), [(0, "plain"), (5, "window"), (23, "softcap"), (37, "scales"), (23, "bfloat16")])
def test_xla_path_equals_the_reference(fill, option):
    """kvjax's XLA path reads less than the reference (row blocks that stop at their last chunk token,
    a cache read up to its last valid slot) and must give its out, lse and mass: every block size,
    prefix branches (slots valid up to `fill` only, with holes: none, a prefix's worth, all)."""
    dtype = jnp.bfloat16 if option == "bfloat16" else jnp.float32
    args, extras = inputs(80 + fill, chunk=11, capacity=37, dtype=dtype)
    args = args[:3] + (args[3] & (jnp.arange(37) < fill),) + args[4:]
    extras = dict(extras, softcap=3.0 if option == "softcap" else None, max_distance=20 if option == "window" else None)
    if option == "scales":
        extras.update(k_scale=jnp.abs(args[1][..., 0]), v_scale=jnp.abs(args[2][..., 1]))
    want = cache_attention_reference(*args, **extras)
    for tokens, prefixes in [(11, (0, 10, 20, 30, 37)), (4, (37,)), (1, (0, 10, 20, 30, 37))]:
        got = jax.jit(lambda *a, t=tokens, p=prefixes: cache_attention_xla(*a, **extras, tokens=t, prefixes=p))(*args)
        seen = np.isfinite(want[1])
        assert (np.isfinite(got[1]) == seen).all(), (tokens, prefixes)
        for name, g, w in zip(("out", "lse", "mass"), (got[0], jnp.where(seen, got[1], 0), got[2]),
                              (want[0], jnp.where(seen, want[1], 0), want[2])):
            assert relative_error(g, w) <= TOL[dtype], (name, tokens, prefixes)


def test_xla_path_block_sizes():
    """Row blocks keep their logits within the budget (one token at least) unless that takes more than
    the most blocks; prefill chunks over large caches branch on none, half or all of the slots; decode
    steps and small caches do not."""
    for b, h, g, c, s in [(1, 3, 3, 1040, 256), (8, 8, 4, 16384, 64), (1, 1, 1, 8, 4096), (64, 8, 8, 65536, 32)]:
        t = reference.block_tokens(b, h, g, c, s)
        blocks = -(-s // t)
        assert 1 <= t <= s and blocks <= reference.MAX_ROW_BLOCKS
        assert blocks == reference.MAX_ROW_BLOCKS or t == 1 or b * h * t * g * (c + s) * 4 <= reference.LOGITS_BLOCK_BYTES
        assert t == s or b * h * (t + 1) * g * (c + s) * 4 > reference.LOGITS_BLOCK_BYTES
    assert reference.cache_prefixes(1040, 256) == (0, 520, 1040)
    assert reference.cache_prefixes(1041, 256) == (0, 521, 1041)
    assert reference.cache_prefixes(1040, 1) == (1040,)
    assert reference.cache_prefixes(reference.PREFIX_MIN_SLOTS - 1, 64) == (reference.PREFIX_MIN_SLOTS - 1,)
    args, extras = inputs(90, chunk=4)
    for bad in [(20,), (20, 10, 37), (0, 20, 36)]:  # a slot never read, not increasing, not the capacity
        with pytest.raises(ValueError, match="increasing slot counts ending at the capacity"):
            cache_attention_xla(*args, **extras, prefixes=bad)


def test_generate_reads_less_and_decodes_the_same(tiny, monkeypatch):
    """End to end under jit: with row blocks of a few tokens and prefix branches on the tiny model's
    small caches, generate gives the tokens and scores of the one-block, whole-cache path."""
    tokens = jax.random.randint(jax.random.key(2), (2, 40), 1, 256)
    policy = kvjax.policies.make("h2o", capacity=32)
    run = lambda: kvjax.generate(tiny, tokens, policy=policy, max_new_tokens=8, chunk_size=16, impl="xla")  # noqa: E731
    monkeypatch.setattr(reference, "PREFIX_MIN_SLOTS", 1 << 30)
    whole = run()
    monkeypatch.setattr(reference, "PREFIX_MIN_SLOTS", 8)
    monkeypatch.setattr(reference, "LOGITS_BLOCK_BYTES", 4096)
    jax.clear_caches()  # the settings are read when tracing
    blocked = run()
    np.testing.assert_array_equal(blocked.tokens, whole.tokens)
    for a, b in zip(blocked.cache.layers, whole.cache.layers):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_allclose(a.score, b.score, rtol=1e-4, atol=1e-5)

def unit_scales(args) -> dict:
    return dict(k_scale=jnp.ones(args[3].shape, jnp.float32), v_scale=jnp.ones(args[3].shape, jnp.float32))


BAD_INPUTS = [
    (lambda a, e: ((a[0][:, :, :2],) + a[1:], e), ValueError, "not a multiple of group"),
    (lambda a, e: (a[:1] + (a[1][:1],) + a[2:], e), ValueError, "k_cache has shape"),
    (lambda a, e: (a[:3] + (a[3].astype(jnp.int32),) + a[4:], e), TypeError, "pass a bool mask"),
    (lambda a, e: (a[:4] + (a[4].astype(jnp.int32),) + a[5:], e), TypeError, "floating inputs"),
    (lambda a, e: (a[:1] + (a[1].astype(jnp.int8),) * 2 + a[3:], e), TypeError, "narrow slots need their scales"),
    (lambda a, e: (a[:1] + (a[1].astype(jnp.int32),) * 2 + a[3:], dict(e, **unit_scales(a))), TypeError, "int8 / float8_e4m3fn"),
    (lambda a, e: (a, dict(e, k_scale=unit_scales(a)["k_scale"])), ValueError, "together"),
    (lambda a, e: (a, dict(e, **dict(unit_scales(a), v_scale=unit_scales(a)["v_scale"][..., :1]))), ValueError, "one scale per slot"),
    (lambda a, e: (a, dict(e, max_distance=4, cache_pos=None)), ValueError, "needs positions"),
    (lambda a, e: (a, dict(e, stat_weights=e["stat_weights"][:, :0])), ValueError, "one weight per query token"),
]


@pytest.mark.parametrize(("edit", "error", "match"), BAD_INPUTS)
def test_bad_inputs_name_the_fix(edit, error, match):
    args, extras = edit(*inputs(70))
    with pytest.raises(error, match=match):
        cache_attention(*args, **extras, backend="tpu", interpret=True)


@pytest.mark.parametrize(("backend", "blocks", "match"), [
    ("gpu", dict(block_k=48), "powers of two.*use block_k=64"),
    ("tpu", dict(block_k=200), "multiples of 128.*use block_k=128"),
    ("tpu", dict(block_r=12), "multiples of 8.*use block_r=8"),
])
def test_blocks_that_cannot_compile_name_the_fix(backend, blocks, match):
    """Compiled (not interpreted) kernels need legal tiles; the check runs before any lowering."""
    args, extras = inputs(71, chunk=16, capacity=300)
    with pytest.raises(ValueError, match=match):
        cache_attention(*args, **extras, backend=backend, interpret=False, **blocks)


DEVICE_CASES = {  # compiled kernels (not interpreted), default blocks from the tuning table
    "decode_f32_mha": dict(group=1, capacity=1000, kv_heads=4, head_dim=128),
    "decode_f32_gqa8_4k": dict(group=8, capacity=4096, kv_heads=2, head_dim=128),
    "decode_bf16_gqa4": dict(group=4, capacity=1000, kv_heads=2, head_dim=128, dtype=jnp.bfloat16),
    "decode_bf16_mqa_d256": dict(group=16, capacity=2048, kv_heads=1, head_dim=256, dtype=jnp.bfloat16),
    "prefill_f32_gqa3": dict(group=3, chunk=128, capacity=1000, kv_heads=3, head_dim=64),
    "prefill_bf16_gqa4": dict(group=4, chunk=256, capacity=3000, kv_heads=2, head_dim=128, dtype=jnp.bfloat16),
    "decode_bf16_int8_slots": dict(group=4, capacity=4096, kv_heads=2, head_dim=128, dtype=jnp.bfloat16, kv_dtype="int8"),
    "prefill_f32_fp8_slots": dict(group=4, chunk=128, capacity=1000, kv_heads=2, head_dim=128, kv_dtype="fp8"),
}


@pytest.mark.device
@pytest.mark.parametrize("case", sorted(DEVICE_CASES))
@pytest.mark.parametrize("options", ["plain", "softcap_window"])
def test_compiled_kernel_matches_reference(case, options):
    """On a GPU or TPU (skipped on CPU): this platform's kernel, compiled, with the mass pass."""
    cfg = dict(DEVICE_CASES[case])
    kv_dtype = cfg.pop("kv_dtype", None)
    args, extras = inputs(80, batch=2, mask="holes", **cfg)
    if kv_dtype:  # narrow slots, read as stored
        fmt = FORMATS[kv_dtype]
        (kq, ks), (vq, vs) = fmt.quantize(args[1]), fmt.quantize(args[2])
        args, extras = (args[0], kq, vq) + args[3:], dict(extras, k_scale=ks, v_scale=vs)
    if options == "softcap_window":
        extras = dict(extras, softcap=30.0, max_distance=40)
    errors = kernel_errors(None, args, extras, interpret=False)
    assert max(errors.values()) <= TOL[cfg.get("dtype", jnp.float32)], errors


@pytest.mark.device
def test_compiled_generate_equals_xla(tiny):
    """generate with the default impl ("auto": the compiled kernels here) against impl="xla"."""
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 1, 256)
    policy = kvjax.policies.make("h2o", capacity=32)
    runs = {impl: kvjax.generate(tiny, tokens, policy=policy, max_new_tokens=16, chunk_size=16, impl=impl) for impl in ("auto", "xla")}
    np.testing.assert_array_equal(runs["auto"].tokens, runs["xla"].tokens)
