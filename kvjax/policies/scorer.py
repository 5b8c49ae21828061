"""The common tier: score the candidates, keep the best (kvpress's `ScorerPress`).

Once a chunk has been attended to, the layer's slots and the chunk's tokens are
the *candidates* for the slots. A scorer policy gives each candidate a score
(what it keeps in `LayerCache.score`) and `kvjax.select` keeps the best, with
the protected tokens (the first `sinks` and the last `window` seen) always kept
and ties evicting the older token. So a method is its `score`, the attention
statistic it consumes (`stat_weights`) and little else.

`KeyRerotation(policy)` wraps any scorer: keys are stored before RoPE and
rotated at their rank inside the cache, as StreamingLLM does (arXiv 2309.17453, Sec. 3.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kvjax import select
from kvjax.cache import LayerCache
from kvjax.policies.base import Policy, Step, check_int
from kvjax.quant import SlotFormat

if TYPE_CHECKING:
    from kvjax.attention import LayerAttention
    from kvjax.cache import KVCache
    from kvjax.protocol import CacheSpec


class Candidates(NamedTuple):
    """A layer's slots (the first `num_cache`) followed by the chunk's tokens, per KV head.

    score: [B, H, N] stored score (0 for chunk tokens).
    mass:  [B, H, N] attention mass received in this chunk, if the policy asked (`stat_weights`).
    pos, valid: [B, H, N].
    k_cache, v_cache: [B, H, C, D] the slots as stored (k_scale, v_scale [B, H, C] if narrow);
    k_new, v_new: [B, H, S, D] the chunk in the model's dtype, keys as they will be stored.
    group: query heads per KV head.
    written_after: what every in-place slot write is ordered after (`kvjax.select.after`): the chunk's
    attention output [B, S, Hq, D], and anything else read from the slots before they are written.
    fmt: the slots' `kvjax.quant.SlotFormat` when they are stored narrow (the chunk is
    quantized as it is written), else None.
    """

    score: Float[Array, "B H N"]
    mass: Float[Array, "B H N"] | None
    pos: Int[Array, "B H N"]
    valid: Bool[Array, "B H N"]
    k_cache: Float[Array, "B H C D"]
    v_cache: Float[Array, "B H C D"]
    k_new: Float[Array, "B H S D"]
    v_new: Float[Array, "B H S D"]
    group: int
    written_after: Array
    k_scale: Float[Array, "B H C"] | None = None
    v_scale: Float[Array, "B H C"] | None = None
    fmt: SlotFormat | None = None

    @classmethod
    def of(cls, lc: LayerCache, k_new, v_new, step: Step, mass, group: int, written_after, fmt: SlotFormat | None = None) -> Candidates:
        """Candidates of `lc` and a chunk given as [B, S, H, D] keys (as stored) and values."""
        b, s, h, _ = k_new.shape
        return cls(
            score=jnp.concatenate([lc.score, jnp.zeros((b, h, s), lc.score.dtype)], -1),
            mass=mass,
            pos=jnp.concatenate([lc.pos, jnp.broadcast_to(step.positions[:, None, :], (b, h, s))], -1),
            valid=jnp.concatenate([lc.valid, jnp.broadcast_to(step.new_valid[:, None, :], (b, h, s))], -1),
            k_cache=lc.k, v_cache=lc.v,
            k_new=k_new.transpose(0, 2, 1, 3), v_new=v_new.transpose(0, 2, 1, 3),
            group=group, written_after=written_after, k_scale=lc.k_scale, v_scale=lc.v_scale, fmt=fmt,
        )

    @property
    def num_cache(self) -> int:
        return self.k_cache.shape[2]

    @property
    def is_new(self) -> Bool[Array, " N"]:
        return jnp.arange(self.pos.shape[-1]) >= self.num_cache

    def new_as_stored(self) -> dict[str, Array]:
        """The chunk's k, v [B, H, S, D] as the slots store them (and k_scale, v_scale [B, H, S] if scaled)."""
        if self.fmt is None:
            return dict(k=self.k_new, v=self.v_new)
        (k, k_scale), (v, v_scale) = self.fmt.quantize(self.k_new), self.fmt.quantize(self.v_new)
        return dict(k=k, v=v) if k_scale is None else dict(k=k, v=v, k_scale=k_scale, v_scale=v_scale)

    def fields(self, score: Float[Array, "B H N"]) -> dict[str, Array]:
        """Every candidate's k, v [B, H, N, D] as stored (and their scales, if narrow) and pos, valid, score [B, H, N]."""
        slots = dict(k=self.k_cache, v=self.v_cache, k_scale=self.k_scale, v_scale=self.v_scale)
        stored = {name: jnp.concatenate([slots[name], new], 2) for name, new in self.new_as_stored().items()}
        return dict(stored, pos=self.pos, valid=self.valid, score=score)


# ----------------------------------------------------------------------------- which queries' attention a score consumes


def every_query(step: Step) -> Float[Array, "B S"]:
    """Weight 1 for every real query of the chunk (accumulated attention, H2O)."""
    return step.new_valid.astype(jnp.float32)


def last_query(step: Step) -> Float[Array, "B S"]:
    """Weight 1 for each row's last real query (TOVA)."""
    last = jnp.cumsum(step.new_valid[:, ::-1], axis=-1)[:, ::-1] == 1
    return (last & step.new_valid).astype(jnp.float32)


# ----------------------------------------------------------------------------- positions keys are rotated at

Rotation = Callable[["LayerAttention", LayerCache, Array, Array, Step], tuple[Array, Array, Array, Array]]


def at_original_positions(attn: LayerAttention, lc: LayerCache, q, k, step: Step):
    """Queries and keys rotated at their token's position; cached keys already are.

    Returns (queries, chunk keys for attention, chunk keys as stored, cached keys for attention).
    """
    at = step.positions[:, :, None]
    k_rot = attn.rope(k, at)
    return attn.rope(q, at), k_rot, k_rot, lc.k


def at_cache_positions(attn: LayerAttention, lc: LayerCache, q, k, step: Step):
    """StreamingLLM's convention: keys stored before RoPE, rotated at their rank among the
    cached tokens (ordered by position); the chunk follows the last cached token."""
    rank = select.inverse(select.position_order(lc.pos, lc.valid))
    n_cached = lc.valid[:, 0].sum(-1, keepdims=True)  # every head holds as many tokens
    chunk_at = (n_cached + jnp.cumsum(step.new_valid, axis=-1) - 1).astype(jnp.int32)[:, :, None]
    return attn.rope(q, chunk_at), attn.rope(k, chunk_at), k, attn.rope(lc.k, rank)


# ----------------------------------------------------------------------------- the tier


@dataclasses.dataclass(frozen=True)
class ScorerPolicy(Policy):
    """Score-then-keep. capacity: slots per (layer, row, KV head); the first `sinks`
    and the last `window` tokens are never evicted. Override `score` (and
    `stat_weights` to receive attention mass in `Candidates.mass`)."""

    capacity: int
    sinks: int = 0
    window: int = 0
    # `keep` writes candidates as stored (`Candidates.fields`, `new_as_stored`), never computing on
    # their values, so narrow slots can stay narrow (`keeps_slots_as_stored`); merging policies cannot
    narrow_slots: ClassVar[bool] = True

    def __post_init__(self):
        self._check_capacity()
        for field in ("sinks", "window"):
            check_int(self, field, getattr(self, field), 0)
        if self.capacity < self.min_capacity:
            raise ValueError(
                f"{self.name}: capacity={self.capacity} cannot hold the protected tokens "
                f"({self.protected_description}); use capacity >= {self.min_capacity}"
            )

    @property
    def min_capacity(self) -> int:
        return self.sinks + self.window

    @property
    def protected_description(self) -> str:
        return f"sinks={self.sinks} + window={self.window}"

    def stat_weights(self, step: Step) -> Float[Array, "B S"] | None:
        """Per-query weights of the attention mass `score` consumes, or None (no mass)."""
        return None

    def score(self, cand: Candidates, step: Step, layer: int) -> Float[Array, "B H N"]:
        """Score of every candidate; higher is kept. Default: none (the newest are kept)."""
        return jnp.zeros_like(cand.score)

    def protected(self, pos: Int[Array, "B H N"], valid: Bool[Array, "B H N"], step: Step) -> Bool[Array, "B H N"]:
        recent = pos >= (step.seen_after - self.window)[:, None, None]
        return valid & ((pos < self.sinks) | recent)

    def keep(self, lc: LayerCache, cand: Candidates, score, rank, step: Step) -> LayerCache:
        """The layer's new slots: the best-ranked candidates."""
        return select.keep_best(lc, cand, score, rank, step)

    def update(self, cache: KVCache, layer: int, q, k, v, step: Step, attn: LayerAttention,
               rotate: Rotation = at_original_positions, fmt: SlotFormat | None = None):
        """The tier's step; `fmt` (from `Quantized`): the slots are stored in that format, attention
        reads them as stored and the kept chunk tokens are quantized as they are written."""
        lc = cache.layers[layer]
        q, k_rot, k_store, k_cached = rotate(attn, lc, q, k, step)
        out, mass = attn(q, k_cached, lc.v, lc.valid, k_rot, v, step, stat_weights=self.stat_weights(step), cache_pos=lc.pos,
                         k_scale=lc.k_scale, v_scale=lc.v_scale)
        cand = Candidates.of(lc, k_store, v, step, mass, group=q.shape[2] // lc.k.shape[1], written_after=out, fmt=fmt)
        score = self.score(cand, step, layer).astype(jnp.float32)
        rank = select.rank(score, cand.valid, self.protected(cand.pos, cand.valid, step))
        return out, cache.replace_layer(layer, self.keep(lc, cand, score, rank, step))


def keeps_slots_as_stored(policy: Policy) -> bool:
    """Whether `policy` runs this tier's `update` and only moves slots as stored (`narrow_slots`), so
    its slots can stay in a narrow format through a step (`Quantized`): attention reads them as stored
    and only the kept chunk tokens are quantized. Others (merging, POD, re-rotation) run on a dequantized view."""
    return isinstance(policy, ScorerPolicy) and policy.narrow_slots and type(policy).update is ScorerPolicy.update


@dataclasses.dataclass(frozen=True)
class KeyRerotation(Policy):
    """`policy` with keys stored before RoPE and rotated at their position inside the cache
    (kvpress's `KeyRerotationPress`); the query sits just after the last cached token."""

    inner: ScorerPolicy

    def __post_init__(self):
        if not isinstance(self.inner, ScorerPolicy):
            raise TypeError(f"KeyRerotation wraps a scorer policy, got {type(self.inner).__name__}")

    @property
    def name(self) -> str:
        return self.inner.name

    def __getattr__(self, attr: str):
        """Everything else (capacity, sinks, window, slots, ...) is the wrapped policy's."""
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def resolve(self, spec: CacheSpec) -> tuple[Policy, ...]:
        return tuple(KeyRerotation(p) for p in self.inner.resolve(spec))

    def init_state(self, spec: CacheSpec, layer: int, batch: int):
        return self.inner.init_state(spec, layer, batch)

    def check_length(self, tokens: int, what: str = "prompt + max_new_tokens") -> None:
        self.inner.check_length(tokens, what)

    def update(self, cache, layer, q, k, v, step, attn):
        return self.inner.update(cache, layer, q, k, v, step, attn, rotate=at_cache_positions)
