"""TPU (Mosaic) variant: key blocks on the innermost, sequential grid axis.

Grid (batch, kv_head, row_block, split, key_block). Scratch accumulators carry
the online softmax across key blocks; the per-(batch, head) extent is
scalar-prefetched into SMEM, so index maps clamp to the last non-empty block
(the pipeline then issues no new copy) and `pl.when` skips the compute. Block
shapes are TPU-legal: key blocks are multiples of 128 lanes or the whole axis,
row blocks multiples of 8 sublanes or all rows; masks and positions carry a unit
axis so their last two block dims are (1, block_k).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blocks import F32, online_update, scores, visible, weighted_mass, widen
from pallas_kernels.region import Inputs, MassInputs, Partials, Region, layout
from pallas_kernels.shapes import Array, Float


def _live(start, ext, r, cfg: Region, rows: int):
    """Whether a key block starting at `start` holds keys that row block `r` may see."""
    live = start < ext
    if cfg.causal:  # the row block's last token bounds the keys it can see
        live &= start <= (jnp.minimum((r + 1) * cfg.block_r, rows) - 1) // cfg.group
    return live


def _kernel(ext_ref, q_ref, k_ref, v_ref, ok_ref, kpos_ref, qpos_ref, ks_ref, vs_ref, o_ref, m_ref, l_ref, m_sc, l_sc, acc_sc, *, cfg: Region, n: int, rows: int, per_split: int):
    b, h, r, sp, kb = (pl.program_id(i) for i in range(5))
    start = (sp * per_split + kb) * cfg.block_k

    @pl.when(kb == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(_live(start, ext_ref[b, h], r, cfg, rows))
    def _compute():
        row = r * cfg.block_r + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_r, 1), 0)
        col = start + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
        q = q_ref[...]
        s = scores(q, k_ref[...], cfg.scale, cfg.softcap, ks_ref[...])
        ok = visible(row, col, ok_ref[...] != 0, n, group=cfg.group, causal=cfg.causal,
                     q_pos=qpos_ref[...], k_pos=kpos_ref[...], max_distance=cfg.max_distance)
        v_ok = start + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_k, 1), 0) < n
        m, l, acc = online_update((m_sc[...], l_sc[...], acc_sc[...]), s, ok, widen(v_ref[...], q), v_ok, vs_ref[...])
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(kb == per_split - 1)
    def _finish():
        o_ref[...], m_ref[...], l_ref[...] = acc_sc[...], m_sc[...], l_sc[...]


def region_attention(inputs: Inputs, cfg: Region, *, interpret=False) -> Partials:
    """One region's partial softmax on TPU (see `region.py` for the contract)."""
    q, k, v, key_ok, k_pos, q_pos, ext, k_scale, v_scale = inputs
    b, h, rows, d = q.shape
    n = k.shape[2]
    splits, per_split = layout(n, cfg.block_k, cfg.num_splits)
    bk, br = cfg.block_k, cfg.block_r

    def key_block(b_, h_, r_, sp, kb, ext_ref):  # clamp: empty blocks re-use the last fetched one
        last = jnp.maximum(pl.cdiv(ext_ref[b_, h_], bk) - 1, 0)
        return jnp.minimum(sp * per_split + kb, last)

    kv_spec = pl.BlockSpec((None, None, bk, d), lambda *i: (i[0], i[1], key_block(*i), 0))
    mask_spec = pl.BlockSpec((None, None, 1, bk), lambda *i: (i[0], i[1], 0, key_block(*i)))
    part = lambda last: pl.BlockSpec((None, None, None, br, last), lambda b_, h_, r_, sp, kb, e: (b_, h_, sp, r_, 0))
    out_specs = [part(d), part(1), part(1)]
    out_shape = [jax.ShapeDtypeStruct((b, h, splits, rows, d), F32)] + [jax.ShapeDtypeStruct((b, h, splits, rows, 1), F32)] * 2
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, pl.cdiv(rows, br), splits, per_split),
        in_specs=[
            pl.BlockSpec((None, None, br, d), lambda b_, h_, r_, sp, kb, e: (b_, h_, r_, 0)),
            kv_spec, kv_spec, mask_spec, mask_spec,
            pl.BlockSpec((None, br, 1), lambda b_, h_, r_, sp, kb, e: (b_, r_, 0)),
            mask_spec, mask_spec,
        ],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((br, 1), F32), pltpu.VMEM((br, 1), F32), pltpu.VMEM((br, d), F32)],
    )
    kernel = functools.partial(_kernel, cfg=cfg, n=n, rows=rows, per_split=per_split)
    return tuple(pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 4 + ("arbitrary",)),
        interpret=interpret,
        name="kvjax_region_attention_tpu",
    )(ext, q, k, v, key_ok, k_pos, q_pos, k_scale, v_scale))


def _mass_kernel(ext_ref, q_ref, k_ref, ok_ref, kpos_ref, qpos_ref, ks_ref, lse_ref, w_ref, mass_ref, *, cfg: Region, n: int, rows: int):
    b, h, kb, r = (pl.program_id(i) for i in range(4))
    start = kb * cfg.block_k

    @pl.when(r == 0)
    def _init():
        mass_ref[...] = jnp.zeros_like(mass_ref)

    @pl.when(_live(start, ext_ref[b, h], r, cfg, rows))
    def _accumulate():
        row = r * cfg.block_r + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_r, 1), 0)
        col = start + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
        ok = visible(row, col, ok_ref[...] != 0, n, group=cfg.group, causal=cfg.causal,
                     q_pos=qpos_ref[...], k_pos=kpos_ref[...], max_distance=cfg.max_distance)
        s = scores(q_ref[...], k_ref[...], cfg.scale, cfg.softcap, ks_ref[...])
        mass_ref[...] += weighted_mass(s, ok, lse_ref[...], w_ref[...], row, rows)


def region_mass(inputs: Inputs, stats: MassInputs, cfg: Region, *, interpret=False) -> Float[Array, "B H N"]:
    """Attention mass per key of one region, given every row's final lse (see `region.py`).

    Grid (batch, kv_head, key block, row block): row blocks run innermost and
    sequentially, accumulating into the key block's resident output; key
    blocks past the extent are neither fetched (clamped index) nor computed."""
    q, k, _, key_ok, k_pos, q_pos, ext, k_scale, _ = inputs
    lse, w = stats
    b, h, rows, d = q.shape
    n = k.shape[2]
    bk, br = cfg.block_k, cfg.block_r
    nkb = pl.cdiv(n, bk)

    def key_block(b_, h_, kb, r_, ext_ref):
        return jnp.minimum(kb, jnp.maximum(pl.cdiv(ext_ref[b_, h_], bk) - 1, 0))

    row_spec = lambda last: pl.BlockSpec((None, None, br, last), lambda b_, h_, kb, r_, e: (b_, h_, r_, 0))
    mask_spec = pl.BlockSpec((None, None, 1, bk), lambda *i: (i[0], i[1], 0, key_block(*i)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, nkb, pl.cdiv(rows, br)),
        in_specs=[
            row_spec(d),
            pl.BlockSpec((None, None, bk, d), lambda *i: (i[0], i[1], key_block(*i), 0)),
            mask_spec, mask_spec,
            pl.BlockSpec((None, br, 1), lambda b_, h_, kb, r_, e: (b_, r_, 0)),
            mask_spec,
            row_spec(1),
            pl.BlockSpec((None, br, 1), lambda b_, h_, kb, r_, e: (b_, r_, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, 1, bk), lambda b_, h_, kb, r_, e: (b_, h_, 0, kb)),
    )
    mass = pl.pallas_call(
        functools.partial(_mass_kernel, cfg=cfg, n=n, rows=rows),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, 1, nkb * bk), F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",)),
        interpret=interpret,
        name="kvjax_region_mass_tpu",
    )(ext, q, k, key_ok, k_pos, q_pos, k_scale, lse, w)
    return mass[:, :, 0, :n]
