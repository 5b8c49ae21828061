"""Pallas kernels (GPU and TPU variants, interpreted on CPU) against the jnp reference.

Interpret mode fills outputs and out-of-bounds block padding with NaN, so a
finite result that matches the reference also shows every output was written
and no padding leaked in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from models import Llama, LlamaConfig
from pallas_kernels import cache_attention, cache_attention_reference

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


def kernel_errors(backend, args, extras, **blocks) -> dict[str, float]:
    """Relative errors of the kernel's output, lse and per-slot mass against the reference."""
    out, lse, mass = cache_attention(*args, **extras, backend=backend, interpret=True, **blocks)
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
