"""Pallas attention kernels for GPU and TPU, each beside its pure-jnp reference (issue 4: not built yet)."""
