"""GPU variant for Pallas' Triton lowering: one program per (batch, kv_head, row block, split).

Programs are independent (Triton has no sequential grid axis), so each one
loops over the key blocks of its split with `fori_loop`, stopping at the
(batch, head) extent: blocks past the last valid slot are never read. Block
sizes must be powers of two (Triton); a block sticking out of the array is
masked by `blocks.visible`. This is the only file that knows the GPU backend:
JAX 0.11 deprecates the Triton backend in favour of Mosaic GPU, and a Mosaic GPU
variant would replace this module behind the same `region_attention` contract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import F32, online_update, scores, visible
from pallas_kernels.region import Inputs, Partials, Region, layout


def _kernel(ext_ref, q_ref, k_ref, v_ref, ok_ref, kpos_ref, qpos_ref, o_ref, m_ref, l_ref, *rest, cfg: Region, n: int, rows: int, per_split: int):
    logits_ref = rest[0] if cfg.return_logits else None
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
        s = scores(q, k_ref[block, :], cfg.scale, cfg.softcap)
        ok = visible(row, col, ok_ref[:, block] != 0, n, group=cfg.group, causal=cfg.causal,
                     q_pos=q_pos, k_pos=kpos_ref[:, block], max_distance=cfg.max_distance)
        if logits_ref is not None:
            logits_ref[:, block] = jnp.where(ok, s, -jnp.inf)
        v_ok = start + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < n
        return online_update(carry, s, ok, v_ref[block, :], v_ok)

    init = (jnp.full((br, 1), -jnp.inf, F32), jnp.zeros((br, 1), F32), jnp.zeros((br, q.shape[-1]), F32))
    m, l, acc = jax.lax.fori_loop(0, hi, body, init)
    if logits_ref is not None:
        def skipped(kb, _):
            logits_ref[:, pl.ds(kb * bk, bk)] = jnp.full((br, bk), -jnp.inf, F32)
        jax.lax.fori_loop(hi, per_split, skipped, None)
    o_ref[...], m_ref[...], l_ref[...] = acc, m, l


def region_attention(inputs: Inputs, cfg: Region, *, interpret=False) -> Partials:
    """One region's partial softmax on GPU (see `region.py` for the contract)."""
    q, k, v, key_ok, k_pos, q_pos, ext = inputs
    b, h, rows, d = q.shape
    n = k.shape[2]
    splits, per_split = layout(n, cfg.block_k, cfg.num_splits, pow2=True)
    span, br = per_split * cfg.block_k, cfg.block_r
    kv_spec = pl.BlockSpec((None, None, span, d), lambda b_, h_, r_, sp: (b_, h_, sp, 0))
    mask_spec = pl.BlockSpec((None, None, 1, span), lambda b_, h_, r_, sp: (b_, h_, 0, sp))
    part = lambda last: pl.BlockSpec((None, None, None, br, last), lambda b_, h_, r_, sp: (b_, h_, sp, r_, 0))
    out_specs = [part(d), part(1), part(1)]
    out_shape = [jax.ShapeDtypeStruct((b, h, splits, rows, d), F32)] + [jax.ShapeDtypeStruct((b, h, splits, rows, 1), F32)] * 2
    if cfg.return_logits:
        out_specs.append(pl.BlockSpec((None, None, br, span), lambda b_, h_, r_, sp: (b_, h_, r_, sp)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, rows, splits * span), F32))
    kernel = functools.partial(_kernel, cfg=cfg, n=n, rows=rows, per_split=per_split)
    outs = pl.pallas_call(
        kernel,
        grid=(b, h, pl.cdiv(rows, br), splits),
        in_specs=[
            pl.BlockSpec((None, None), lambda b_, h_, r_, sp: (b_, h_)),
            pl.BlockSpec((None, None, br, d), lambda b_, h_, r_, sp: (b_, h_, r_, 0)),
            kv_spec, kv_spec, mask_spec, mask_spec,
            pl.BlockSpec((None, br, 1), lambda b_, h_, r_, sp: (b_, r_, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="kvjax_region_attention_gpu",
    )(ext, q, k, v, key_ok, k_pos, q_pos)
    return (*outs[:3], outs[3] if cfg.return_logits else None)
