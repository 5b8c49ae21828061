"""RoPE (arXiv 2104.09864) against a float64 formula, and its tables evaluated once per position."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.rope import TABLES_MIN_POSITIONS


def rope_float64(x: np.ndarray, positions: np.ndarray, theta: float, interleaved: bool) -> np.ndarray:
    """Each pair (x_i, x_j) turned by the angle position * theta^(-2i/D), in float64 from the angle on:
    the angle itself is rounded to float32 as every implementation (Hugging Face's too) computes it,
    which at position 70,000 moves it by up to 4e-3 rad."""
    d = x.shape[-1]
    inv_freq = (1.0 / theta ** (np.arange(0, d, 2) / d)).astype(np.float32)
    angles = (positions[..., None].astype(np.float32) * inv_freq).astype(np.float64)
    cos, sin = np.cos(angles), np.sin(angles)
    x = x.astype(np.float64)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2:])
    turned_a, turned_b = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        return np.stack([turned_a, turned_b], axis=-1).reshape(x.shape)
    return np.concatenate([turned_a, turned_b], axis=-1)


@pytest.mark.parametrize("tokens", [1, TABLES_MIN_POSITIONS - 1, 256])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_the_float64_rotation(tokens, interleaved):
    x = np.asarray(jax.random.normal(jax.random.key(tokens), (2, tokens, 9, 64)), np.float32)
    positions = np.arange(tokens)[None, :, None] + np.array([[[5]], [[70_000]]])  # far positions too
    rope = kvjax.Rope(theta=100_000.0, interleaved=interleaved)
    got = jax.jit(rope)(x, positions.astype(np.int32))
    np.testing.assert_allclose(got, rope_float64(x, positions, 100_000.0, interleaved), atol=2e-4, rtol=1e-5)


def test_rope_tables_are_evaluated_once_per_position_not_per_head():
    """A chunk's cos and sin rotate every head; XLA CPU would evaluate them once per rotated element
    (9x the work for SmolLM2's queries) if they fused into the rotation. Every fusion that evaluates
    a cosine or sine must output no more elements than the tables have."""
    x = jnp.zeros((1, 256, 9, 64))
    positions = jnp.zeros((1, 256, 1), jnp.int32)
    hlo = jax.jit(kvjax.Rope()).lower(x, positions).compile().as_text()
    table_elements = 256 * 32
    computations = re.split(r"\n(?=\S)", hlo)
    evaluating = {c.split()[0].lstrip("%") for c in computations if re.search(r"\b(cosine|sine)\(", c)}
    assert evaluating, "no cosine in the compiled rotation"
    for line in hlo.splitlines():
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called and called.group(1) in evaluating:
            out_shapes = line.split(" fusion(")[0]
            elements = [int(np.prod([int(n) for n in dims.split(",") if n])) for dims in re.findall(r"\[([\d,]*)\]", out_shapes)]
            assert max(elements) <= table_elements, f"tables evaluated per rotated element: {line.strip()[:160]}"
