"""One layer's attention over its fixed-capacity cache, then its policy's update.

Models call `attend` from each attention layer with pre-RoPE queries and keys
and the layer's own facts (RoPE, scale); the cache carries the policy of every
layer (resolved once, in `CacheSpec.init`), and `attend` hands the layer to it.
The cache goes in and comes out, so under `jax.jit` with the cache donated a
decode step writes one slot per (row, KV head) in place.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from kvjax.attention import LayerAttention
from kvjax.cache import KVCache
from kvjax.policies.base import Step
from kvjax.rope import Rope


def _check(cache: KVCache, layer: int, q, k, v, step: Step) -> None:
    b, s = step.positions.shape
    if not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer={layer} is out of range for a cache of {cache.num_layers} layers")
    if len(cache.policies) != cache.num_layers:
        raise ValueError("attend: this cache has no policy; build it with CacheSpec.init(policy, batch) (or model.cache_spec().init)")
    want_kv = (b, s, cache.kv_heads, cache.head_dim)
    for name, x in (("k", k), ("v", v)):
        if x.shape != want_kv:
            raise ValueError(f"attend: {name} has shape {x.shape}, expected [batch, chunk, kv_heads, head_dim] = {want_kv}")
    if q.ndim != 4 or q.shape[:2] != (b, s) or q.shape[3] != cache.head_dim or q.shape[2] % cache.kv_heads:
        raise ValueError(
            f"attend: q has shape {q.shape}, expected [batch={b}, chunk={s}, a multiple of "
            f"kv_heads={cache.kv_heads}, head_dim={cache.head_dim}]"
        )
    want = cache.layers[layer].k.dtype
    if cache.policies[layer].kv_format is None and (k.dtype != want or v.dtype != want):
        raise TypeError(f"attend: k/v dtype {k.dtype}/{v.dtype} differs from the cache dtype {want}")


def attend(
    cache: KVCache,
    layer: int,
    q: Float[Array, "B S Hq D"],
    k: Float[Array, "B S H D"],
    v: Float[Array, "B S H D"],
    *,
    step: Step,
    rope: Rope,
    scale: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> tuple[Float[Array, "B S Hq D"], KVCache]:
    """Attend chunk queries to layer `layer` of the cache, then compress the chunk in.

    Returns the attention output and the cache with that layer updated (the
    caller advances `cache.seen` once all layers are done).
    """
    _check(cache, layer, q, k, v, step)
    attn = LayerAttention(rope=rope, scale=scale, softcap=softcap, sliding_window=sliding_window)
    return cache.policies[layer].update(cache, layer, q, k, v, step, attn)
