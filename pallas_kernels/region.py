"""The contract both backend kernels implement: attention of query rows over one key region.

A region is either the cache slots (per-slot valid mask, no causality) or the
chunk being written (causal by chunk index). Rows are (token, head-in-group)
pairs flattened token-major, so all query heads of a KV group share one program
and read each key block once (GQA/MQA). A kernel returns, per split of the key
axis, the unnormalised output and the running max and normaliser; `blocks.combine`
merges splits and regions.

A second kernel per backend, `region_mass`, produces the per-key attention mass
that scoring policies consume: once the final log-sum-exp of every row is known
(all splits and both regions merged), it reads the region's keys again and
reduces `w_r * exp(s_rn - lse_r)` over rows inside the kernel, so it writes
O(keys) floats per (batch, KV head) and never the [rows, keys] probabilities.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.shapes import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Region:
    """Static configuration of one region's kernel call (hashable, part of the jit key)."""

    group: int  # query heads per KV head
    causal: bool  # keys of the chunk itself: key index <= token index of the row
    scale: float
    softcap: float | None
    max_distance: int | None  # sliding window over positions, None for none
    block_r: int  # query rows per program
    block_k: int  # keys per block
    num_splits: int  # key-axis splits (flash-decoding); 1 for prefill


Inputs = tuple[
    Float[Array, "B H R D"],  # q rows
    Array,  # k [B, H, N, D] as stored: float, or int8 / fp8 with k_scale
    Array,  # v [B, H, N, D]
    Int[Array, "B H 1 N"],  # key_ok (int32: 1 valid, 0 not)
    Int[Array, "B H 1 N"],  # k_pos
    Int[Array, "B R 1"],  # q_pos per row
    Int[Array, "B H"],  # extent: one past the last valid key
    Float[Array, "B H 1 N"],  # k_scale: each stored key's dequantization scale (1 for unscaled keys)
    Float[Array, "B H 1 N"],  # v_scale
]

Partials = tuple[
    Float[Array, "B H P R D"],  # unnormalised output per split
    Float[Array, "B H P R 1"],  # running max
    Float[Array, "B H P R 1"],  # normaliser
]

MassInputs = tuple[
    Float[Array, "B H R 1"],  # final lse per row (-inf: the row attends to nothing)
    Float[Array, "B R 1"],  # weight per row (its token's stat weight; 0 for padding)
]


def layout(n: int, block_k: int, num_splits: int, *, pow2: bool = False) -> tuple[int, int]:
    """(splits, blocks per split) covering n keys; every split holds at least one real block.
    With `pow2` the blocks per split are a power of two (Triton block shapes must be)."""
    nblocks = -(-n // block_k)
    per_split = -(-nblocks // max(1, min(num_splits, nblocks)))
    if pow2:
        per_split = 1 << (per_split - 1).bit_length()
    return -(-nblocks // per_split), per_split
