"""Default block sizes as data: one row per (backend, chip), the way JAX's own ops keep them.

The chip is the one being compiled for: an abstract mesh's device when one is
set (`jax.sharding.use_abstract_mesh`, e.g. exporting for TPU from a CPU host),
else the default backend's first device. Rows are matched by a substring of
`device_kind` ("TPU v5 lite", "TPU v6 lite", "NVIDIA H100 80GB HBM3", ...); the
row with an empty substring is the backend's fallback.

The rows follow the chips' shapes, not timings (no accelerator has timed them
yet; `experiments.device_check` is the script that will):
- TPU: key blocks are multiples of 128 lanes; v6e's 256x256 MXU takes wider
  blocks than v5e's 128x128. One TensorCore per chip (v5e, v6e) needs no split
  of the key axis; megacore chips (v4, v5p) get two.
- GPU: Triton blocks are powers of two; decode splits the capacity until about
  two programs per SM run (132 SMs on H100/H200, 108 on A100).
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sizes of one chip: prefill rows per program, keys per block, decode programs to fill it."""

    block_r: int
    block_k: int
    programs: int


TABLE: dict[tuple[str, str], Blocks] = {
    ("tpu", "TPU v5 lite"): Blocks(block_r=256, block_k=512, programs=1),
    ("tpu", "TPU v6"): Blocks(block_r=256, block_k=1024, programs=1),
    ("tpu", ""): Blocks(block_r=256, block_k=512, programs=2),
    ("gpu", "H100"): Blocks(block_r=64, block_k=64, programs=264),
    ("gpu", "H200"): Blocks(block_r=64, block_k=64, programs=264),
    ("gpu", "A100"): Blocks(block_r=64, block_k=64, programs=216),
    ("gpu", ""): Blocks(block_r=64, block_k=64, programs=256),
}


def _abstract_device():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else getattr(mesh, "abstract_device", None)


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform being compiled for (an abstract mesh's, else the default backend)."""
    device = _abstract_device()
    return device.platform if device is not None else jax.default_backend()


def device_kind() -> str:
    """The chip being compiled for, as JAX names it (e.g. "TPU v6 lite", "NVIDIA H100 80GB HBM3", "cpu")."""
    device = _abstract_device()
    return device.device_kind if device is not None else jax.devices()[0].device_kind


def blocks_for(backend: str, kind: str | None = None) -> Blocks:
    """The table's row for `backend` ("gpu" or "tpu") on chip `kind` (default: the target's)."""
    kind = device_kind() if kind is None else kind
    for (row_backend, match), blocks in TABLE.items():
        if row_backend == backend and match and match in kind:
            return blocks
    return TABLE[(backend, "")]
