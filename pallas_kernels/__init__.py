"""Pallas attention over a fixed-capacity KV cache (GPU and TPU), beside its pure-jnp reference.

`cache_attention` (kernels), `cache_attention_reference` (jnp) and
`cache_attention_xla` (the reference reading less, kvjax's XLA path) take the
same arguments and agree to float tolerance. Depends on JAX only.
"""

from pallas_kernels.attention import cache_attention, default_backend
from pallas_kernels.reference import cache_attention_reference, cache_attention_xla

__all__ = ["cache_attention", "cache_attention_reference", "cache_attention_xla", "default_backend"]
