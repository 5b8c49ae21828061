"""Attention of a chunk of queries over (cache slots + the chunk itself).

The single attention entry point for decode (chunk of one) and chunked
prefill. It checks shapes, lays queries out as rows (token, head-in-group) per
KV head, and dispatches: `impl="xla"` runs `pallas_kernels.cache_attention_xla`
(the reference's softmax, reading less; the CPU path), `impl="pallas"` the Pallas kernels
(interpreted on CPU), `impl="auto"` the kernels on GPU/TPU and XLA on CPU. When
a policy needs per-slot statistics, the probability mass each key receives
(summed over the query heads of its KV group, weighted per query) comes out of
the same pass.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from beartype import beartype
from einops import rearrange
from jaxtyping import Array, Bool, Float, Int, Shaped, jaxtyped

from kvjax.rope import Rope
from kvjax.sharding import per_shard
from pallas_kernels import cache_attention, cache_attention_xla
from pallas_kernels.tuning import target_platform

if TYPE_CHECKING:
    from kvjax.policies.base import Step

IMPLS = ("xla", "pallas", "auto")


def resolve_impl(impl: str) -> str:
    """'auto' picks the Pallas kernels when compiling for GPU/TPU and XLA for CPU; the platform is
    an abstract mesh's if one is set (exporting for TPU from a CPU host), else the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if target_platform() in ("gpu", "tpu") else "xla"
    return impl


@jaxtyped(typechecker=beartype)
def attention(
    q: Float[Array, "B S Hq D"],
    k_cache: Shaped[Array, "B H C D"],
    v_cache: Shaped[Array, "B H C D"],
    cache_valid: Bool[Array, "B H C"],
    k_new: Float[Array, "B S H D"],
    v_new: Float[Array, "B S H D"],
    new_valid: Bool[Array, "B S"],
    *,
    scale: float,
    softcap: float | None = None,
    stat_weights: Float[Array, "B S"] | None = None,
    max_distance: int | None = None,
    cache_pos: Int[Array, "B H C"] | None = None,
    q_pos: Int[Array, "B S"] | None = None,
    k_scale: Float[Array, "B H C"] | None = None,
    v_scale: Float[Array, "B H C"] | None = None,
    impl: str = "auto",
) -> tuple[Float[Array, "B S Hq D"], Float[Array, "B H N"] | None]:
    """Softmax attention of `q` over valid cache slots and causally over the chunk.

    Query i of the chunk sees every valid cache slot and chunk keys j <= i that
    are valid; with `max_distance` (a sliding window) only keys at most that
    many positions back (positions from `cache_pos` and `q_pos`). Padding
    queries (`new_valid` False) return zeros.

    Returns the output and, if `stat_weights` is given, the attention mass per
    key, `mass[b, h, n] = sum_{g, s} w[b, s] * p[b, h*G+g, s, n]`, over the
    candidates n = (C cache slots, then S chunk tokens).

    Slots stored narrow (int8 / fp8, `kvjax.quant`) come with their per-slot
    `k_scale` / `v_scale`; both paths read them as stored and scale inside.
    """
    impl = resolve_impl(impl)
    b, s, hq, d = q.shape
    h = k_cache.shape[1]
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    g = hq // h
    rows = rearrange(q, "b s (h g) d -> b h (s g) d", h=h)  # row r = s * g + (head in group)
    arrays = dict(q=rows, k_cache=k_cache, v_cache=v_cache, cache_valid=cache_valid, k_new=k_new.transpose(0, 2, 1, 3),
                  v_new=v_new.transpose(0, 2, 1, 3), new_valid=new_valid, cache_pos=cache_pos, q_pos=q_pos, stat_weights=stat_weights,
                  k_scale=k_scale, v_scale=v_scale)
    settings = dict(group=g, scale=scale, softcap=softcap, max_distance=max_distance)
    if impl == "pallas":  # XLA partitions the XLA path itself; a Pallas call runs per shard
        out, _, mass = per_shard(lambda **a: cache_attention(**a, **settings), arrays, batch=b, heads=h)
    else:
        out, _, mass = cache_attention_xla(**arrays, **settings)
    return rearrange(out, "b h (s g) d -> b s (h g) d", g=g), mass


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """One attention layer's facts from the model, handed to its policy's `update`.

    rope: how queries and keys are rotated (policies choose the positions).
    scale: the logit scale (1/sqrt(head_dim) unless the model says otherwise).
    softcap: c in c * tanh(logit / c) (Gemma 2), or None.
    sliding_window: tokens the layer sees, the current one included, or None.
    """

    rope: Rope
    scale: float
    softcap: float | None = None
    sliding_window: int | None = None

    def __call__(self, q, k_cache, v_cache, cache_valid, k_new, v_new, step: Step, *, stat_weights=None, cache_pos=None,
                 k_scale=None, v_scale=None):
        """`attention` of rotated chunk queries over (cache slots + chunk) with this layer's settings;
        `cache_pos` (the slots' positions) is needed by sliding-window layers only; `k_scale` /
        `v_scale` come with narrow slots."""
        windowed = self.sliding_window is not None
        return attention(
            q, k_cache, v_cache, cache_valid, k_new, v_new, step.new_valid, scale=self.scale, softcap=self.softcap,
            stat_weights=stat_weights, max_distance=self.sliding_window - 1 if windowed else None,
            cache_pos=cache_pos if windowed else None, q_pos=step.positions if windowed else None, k_scale=k_scale,
            v_scale=v_scale, impl=step.impl,
        )


def causal_attention(
    q: Float[Array, "B T Hq D"], k: Float[Array, "B T H D"], v: Float[Array, "B T H D"], *, scale: float,
    bias: Float[Array, "B H T T"] | None = None, logits: Float[Array, "B H G T T"] | None = None,
) -> Float[Array, "B T Hq D"]:
    """Full-sequence attention of every position over keys j <= i (training paths), queries and
    keys already rotated. `bias` is added to the logits per (KV head, query, key) (DMC's
    intermediate-state mask); `logits` replaces q.k (POD mixes two key sets), scale still applied."""
    t = q.shape[1]
    logits = (grouped_logits(q, k) if logits is None else logits) * scale
    if bias is not None:
        logits = logits + bias[:, :, None]
    p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhgij,bjhd->bihgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return rearrange(out, "b t h g d -> b t (h g) d").astype(q.dtype)


def grouped_logits(q: Float[Array, "B T Hq D"], k: Float[Array, "B T H D"]) -> Float[Array, "B H G T T"]:
    """q.k of every (query, key) pair per KV group, in f32 (unscaled)."""
    qg = rearrange(q, "b t (h g) d -> b t h g d", h=k.shape[2])
    return jnp.einsum("bihgd,bjhd->bhgij", qg, k, preferred_element_type=jnp.float32)
