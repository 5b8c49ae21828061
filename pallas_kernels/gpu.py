"""GPU variant for Pallas' Triton lowering: one program per (batch, kv_head, row block, split).

Programs are independent (Triton has no sequential grid axis), so each one
loops over the key blocks of its split with `fori_loop`, stopping at the
(batch, head) extent: blocks past the last valid slot are never read. Block
sizes must be powers of two (Triton); a block sticking out of the array is
masked by `blocks.visible`. `region_mass` is the statistic's second pass. This is the only file that knows the GPU backend:
JAX 0.11 deprecates the Triton backend in favour of Mosaic GPU, and a Mosaic GPU
variant would replace this module behind the same `region_attention` contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import F32, online_update, scores, visible, weighted_mass, widen
from pallas_kernels.region import Inputs, MassInputs, Partials, Region, layout
from pallas_kernels.shapes import Array, Float


def _kernel(ext_ref, q_ref, k_ref, v_ref, ok_ref, kpos_ref, qpos_ref, ks_ref, vs_ref, o_ref, m_ref, l_ref, *, cfg: Region, n: int, rows: int, per_split: int):
    r, sp = pl.program_id(2), pl.program_id(3)
    bk, br = cfg.block_k, cfg.block_r
    base = sp * per_split * bk
    hi = pl.cdiv(ext_ref[...] - base, bk)
    if cfg.causal:  # the row block's last token bounds the keys it can see
        hi = jnp.minimum(hi, pl.cdiv((jnp.minimum((r + 1) * br, rows) - 1) // cfg.group + 1 - base, bk))
    hi = jnp.clip(hi, 0, per_split)
    row = r * br + jax.lax.broadcasted_iota(jnp.int32, (br, 1), 0)
    q, q_pos = q_ref[...], qpos_ref[...]

    def body(kb, carry):
        block = pl.ds(kb * bk, bk)
        start = base + kb * bk
        col = start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        s = scores(q, k_ref[block, :], cfg.scale, cfg.softcap, ks_ref[:, block])
        ok = visible(row, col, ok_ref[:, block] != 0, n, group=cfg.group, causal=cfg.causal,
                     q_pos=q_pos, k_pos=kpos_ref[:, block], max_distance=cfg.max_distance)
        v_ok = start + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < n
        return online_update(carry, s, ok, widen(v_ref[block, :], q), v_ok, vs_ref[:, block])

    init = (jnp.full((br, 1), -jnp.inf, F32), jnp.zeros((br, 1), F32), jnp.zeros((br, q.shape[-1]), F32))
    m, l, acc = jax.lax.fori_loop(0, hi, body, init)
    o_ref[...], m_ref[...], l_ref[...] = acc, m, l


def region_attention(inputs: Inputs, cfg: Region, *, interpret=False) -> Partials:
    """One region's partial softmax on GPU (see `region.py` for the contract)."""
    q, k, v, key_ok, k_pos, q_pos, ext, k_scale, v_scale = inputs
    b, h, rows, d = q.shape
    n = k.shape[2]
    splits, per_split = layout(n, cfg.block_k, cfg.num_splits, pow2=True)
    span, br = per_split * cfg.block_k, cfg.block_r
    kv_spec = pl.BlockSpec((None, None, span, d), lambda b_, h_, r_, sp: (b_, h_, sp, 0))
    mask_spec = pl.BlockSpec((None, None, 1, span), lambda b_, h_, r_, sp: (b_, h_, 0, sp))
    part = lambda last: pl.BlockSpec((None, None, None, br, last), lambda b_, h_, r_, sp: (b_, h_, sp, r_, 0))
    out_specs = [part(d), part(1), part(1)]
    out_shape = [jax.ShapeDtypeStruct((b, h, splits, rows, d), F32)] + [jax.ShapeDtypeStruct((b, h, splits, rows, 1), F32)] * 2
    kernel = functools.partial(_kernel, cfg=cfg, n=n, rows=rows, per_split=per_split)
    return tuple(pl.pallas_call(
        kernel,
        grid=(b, h, pl.cdiv(rows, br), splits),
        in_specs=[
            pl.BlockSpec((None, None), lambda b_, h_, r_, sp: (b_, h_)),
            pl.BlockSpec((None, None, br, d), lambda b_, h_, r_, sp: (b_, h_, r_, 0)),
            kv_spec, kv_spec, mask_spec, mask_spec,
            pl.BlockSpec((None, br, 1), lambda b_, h_, r_, sp: (b_, r_, 0)),
            mask_spec, mask_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="kvjax_region_attention_gpu",
    )(ext, q, k, v, key_ok, k_pos, q_pos, k_scale, v_scale))


def _mass_kernel(ext_ref, q_ref, k_ref, ok_ref, kpos_ref, qpos_ref, ks_ref, lse_ref, w_ref, mass_ref, *, cfg: Region, n: int, rows: int, block_r: int, row_blocks: int):
    bk = cfg.block_k
    start = pl.program_id(2) * bk
    col = start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k, key_ok, k_pos, k_scale = k_ref[...], ok_ref[...] != 0, kpos_ref[...], ks_ref[...]
    # rows of tokens before `start` see none of this block's chunk keys (causal)
    first = (start * cfg.group) // block_r if cfg.causal else 0
    last = jnp.where(start < ext_ref[...], row_blocks, 0)  # blocks past the extent hold no valid key

    def body(rb, acc):
        block = pl.ds(rb * block_r, block_r)
        row = rb * block_r + jax.lax.broadcasted_iota(jnp.int32, (block_r, 1), 0)
        ok = visible(row, col, key_ok, n, group=cfg.group, causal=cfg.causal, q_pos=qpos_ref[block, :],
                     k_pos=k_pos, max_distance=cfg.max_distance)
        s = scores(q_ref[block, :], k, cfg.scale, cfg.softcap, k_scale)
        return acc + weighted_mass(s, ok, lse_ref[block, :], w_ref[block, :], row, rows)

    mass_ref[...] = jax.lax.fori_loop(first, last, body, jnp.zeros((1, bk), F32))


def region_mass(inputs: Inputs, stats: MassInputs, cfg: Region, *, interpret=False) -> Float[Array, "B H N"]:
    """Attention mass per key of one region, given every row's final lse (see `region.py`).

    One program per (batch, kv_head, key block) loops over the row blocks (Triton
    has no sequential grid axis to accumulate over); all rows are one block of
    a power-of-two length, sliced inside."""
    q, k, _, key_ok, k_pos, q_pos, ext, k_scale, _ = inputs
    lse, w = stats
    b, h, rows, d = q.shape
    n = k.shape[2]
    bk = cfg.block_k
    all_rows = pl.next_power_of_2(rows)
    block_r = min(cfg.block_r, all_rows)
    nkb = pl.cdiv(n, bk)
    row_spec = lambda last: pl.BlockSpec((None, None, all_rows, last), lambda b_, h_, kb: (b_, h_, 0, 0))
    token_spec = pl.BlockSpec((None, all_rows, 1), lambda b_, h_, kb: (b_, 0, 0))
    key_spec = pl.BlockSpec((None, None, 1, bk), lambda b_, h_, kb: (b_, h_, 0, kb))
    kernel = functools.partial(_mass_kernel, cfg=cfg, n=n, rows=rows, block_r=block_r, row_blocks=all_rows // block_r)
    mass = pl.pallas_call(
        kernel,
        grid=(b, h, nkb),
        in_specs=[
            pl.BlockSpec((None, None), lambda b_, h_, kb: (b_, h_)),
            row_spec(d),
            pl.BlockSpec((None, None, bk, d), lambda b_, h_, kb: (b_, h_, kb, 0)),
            key_spec, key_spec, token_spec, key_spec, row_spec(1), token_spec,
        ],
        out_specs=key_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, 1, nkb * bk), F32),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="kvjax_region_mass_gpu",
    )(ext, q, k, key_ok, k_pos, q_pos, k_scale, lse, w)
    return mass[:, :, 0, :n]
