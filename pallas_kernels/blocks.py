"""Block math shared by the GPU and TPU kernels: scores, visibility, online softmax.

Both kernels walk key blocks of one region and keep, per query row, the running
max `m`, the running normaliser `l` and the unnormalised output `acc`
(flash attention, Dao et al. 2022, Alg. 1). Splits of the key axis and separate
regions (cache slots, the chunk itself) are merged afterwards by `combine`, a
log-sum-exp over partial results (flash-decoding). Row vectors stay 2-D
(`[rows, 1]`) because Mosaic lays out 1-D vectors poorly.

Narrow slots (int8 / fp8 with one f32 scale per key, `kvjax.quant`) are read
from memory as stored and widened in the block: a key's scale multiplies its
logit column and a value's scale its probability column, so the scales stay
lane-dense `[1, keys]` rows and no dequantized block is ever written back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.shapes import Array, Bool, Float, Int

F32 = jnp.float32


def widen(x: Array, like: Array) -> Array:
    """`x` in `like`'s dtype when it is stored narrower (int8, fp8, or bf16 slots under f32 queries)."""
    return x if x.dtype == like.dtype else x.astype(F32).astype(like.dtype)


def scores(q: Float[Array, "R D"], k: Array, scale: float, softcap: float | None,
           k_scale: Float[Array, "1 K"] | None = None) -> Float[Array, "R K"]:
    """Scaled (and optionally soft-capped, `c * tanh(s / c)`) logits in f32; `k_scale` is each
    stored key's dequantization scale (q . (k_data * s_k) = (q . k_data) * s_k).

    Key blocks of fewer than 8 rows (the chunk region of a decode step: one key)
    are multiplied in f32, which is exact: Mosaic rejects the bf16 -> f32
    broadcast it would emit for them ("vector.broadcast ... same element type")."""
    k = widen(k, q)
    if k.shape[0] < 8:
        q, k = q.astype(F32), k.astype(F32)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32)
    s = s * scale if k_scale is None else s * (k_scale * scale)
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def visible(
    rows: Int[Array, "R 1"],
    cols: Int[Array, "1 K"],
    key_ok: Bool[Array, "1 K"],
    n: int,
    *,
    group: int,
    causal: bool,
    q_pos: Int[Array, "R 1"] | None,
    k_pos: Int[Array, "1 K"] | None,
    max_distance: int | None,
) -> Bool[Array, "R K"]:
    """Which (row, key) pairs attend: key in bounds and valid; causal by chunk index; inside the window."""
    ok = (cols < n) & key_ok
    if causal:  # rows are (token, head-in-group) pairs: token = row // group
        ok &= cols <= rows // group
    if max_distance is not None:
        ok &= q_pos - k_pos <= max_distance
    return ok


def online_update(carry, s: Float[Array, "R K"], ok: Bool[Array, "R K"], v: Array, v_ok: Bool[Array, "K 1"],
                  v_scale: Float[Array, "1 K"] | None = None):
    """One key block of online softmax; fully masked rows keep m = -inf and l = 0. `v` comes
    widened to the queries' dtype (`widen`); a stored value's scale multiplies its probability
    column (p . (v_data * s_v) = (p * s_v) . v_data)."""
    m, l, acc = carry
    s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1, keepdims=True))
    m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # a comparison, which Mosaic and Triton both lower
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    v = jnp.where(v_ok, v, jnp.zeros_like(v))  # out-of-bounds rows may hold NaN
    pv = p if v_scale is None else jnp.where(ok, p * v_scale, 0.0)  # scales past the array may be NaN
    acc = alpha * acc + jnp.dot(pv.astype(v.dtype), v, preferred_element_type=F32)
    return m_new, alpha * l + p.sum(-1, keepdims=True), acc


def weighted_mass(
    s: Float[Array, "R K"], ok: Bool[Array, "R K"], lse: Float[Array, "R 1"], w: Float[Array, "R 1"],
    row: Int[Array, "R 1"], rows: int,
) -> Float[Array, "1 K"]:
    """One key block's attention mass, sum_r w_r * exp(s_rk - lse_r) over visible pairs. Rows with
    lse = -inf (padding) add nothing, and so do rows past the array (`row >= rows`: the last row
    block may stick out, and what it reads there is undefined, NaN included)."""
    in_bounds = row < rows
    lse = jnp.where(lse > -jnp.inf, lse, jnp.inf)  # exp(s - inf) = 0, not exp(+inf)
    p = jnp.where(ok & in_bounds, jnp.exp(s - lse), 0.0)
    return jnp.sum(p * jnp.where(in_bounds, w, 0.0), axis=0, keepdims=True)


def combine(
    o: Float[Array, "B H P R D"], m: Float[Array, "B H P R 1"], l: Float[Array, "B H P R 1"]
) -> tuple[Float[Array, "B H R D"], Float[Array, "B H R"]]:
    """Merge P partial softmaxes (splits and regions) by log-sum-exp: normalised output and lse."""
    top = m.max(axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(m - top)
    den = (w * l).sum(axis=2)
    out = (w * o).sum(axis=2) / jnp.where(den > 0, den, 1.0)
    lse = jnp.where(den > 0, jnp.log(jnp.where(den > 0, den, 1.0)) + top[:, :, 0], -jnp.inf)
    return out, lse[..., 0]


def extent(valid: Bool[Array, "B H N"]) -> Int[Array, "B H"]:
    """One past the last valid slot per (batch, head): blocks at or beyond it are skipped."""
    idx = jnp.arange(1, valid.shape[-1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(valid, idx, 0), axis=-1).astype(jnp.int32)
