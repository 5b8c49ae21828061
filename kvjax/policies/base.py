"""The general tier of the policy contract: one layer update over a fixed-shape cache.

A policy is a frozen dataclass of static settings. Before a loop it is bound
to the model once (`resolve`, kvpress's `post_init_from_model`): one policy per
layer, with the model's facts (layer count, KV heads, head size, sliding
windows) filled in. The cache carries that per-layer tuple, so a model's
layers only hand `kvjax.attend` their queries, keys, values and the `Step`.

Every policy implements `update`: attend the chunk's queries over the layer's
slots and the chunk, then write what the layer keeps. Two shared
implementations cover most methods:
- `kvjax.policies.scorer.ScorerPolicy`: score the candidates and keep the best
  (a method is its `score`, e.g. H2O, SnapKV, KNorm);
- `kvjax.policies.merging.MergingPolicy`: rewrite the slots by merging (BCT, KVMerger).
Methods that do their own thing (DMC, POD) implement `update` with the library
pieces: `LayerAttention` (RoPE and attention), `kvjax.select`, the cache's
`replace_layer` / `replace_state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

if TYPE_CHECKING:
    from kvjax.attention import LayerAttention
    from kvjax.cache import KVCache
    from kvjax.protocol import CacheSpec


@struct.dataclass
class Step:
    """What a layer needs to know about the chunk being consumed.

    seen:      [B] tokens consumed before the chunk.
    positions: [B, S] original position of each chunk token.
    new_valid: [B, S] chunk token is real (not padding).
    key:       PRNG key of this chunk (policies fold in the layer).
    prefill:   static; the chunk belongs to the prompt.
    impl:      static; attention backend ("xla", "pallas" or "auto").
    """

    seen: Int[Array, " B"]
    positions: Int[Array, "B S"]
    new_valid: Bool[Array, "B S"]
    key: jax.Array
    prefill: bool = struct.field(pytree_node=False, default=True)
    impl: str = struct.field(pytree_node=False, default="auto")

    @property
    def seen_after(self) -> Int[Array, " B"]:
        return self.seen + self.new_valid.sum(-1).astype(jnp.int32)


def check_int(policy: object, name: str, value, lowest: int) -> None:
    """Raise unless `value` is an int >= lowest, naming the policy and the option."""
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        raise ValueError(f"{getattr(policy, 'name', type(policy).__name__)}: {name} must be an int >= {lowest}, got {value!r}")


def derive_defaults(policy: object, **rules) -> None:
    """Fill options left at None from the capacity: `rules` maps an option to capacity -> value.

    The one way a policy's default depends on its capacity (H2O's window =
    capacity // 2, ...). A capacity that is not an int leaves 0, so that the
    capacity check names the real problem.
    """
    capacity = getattr(policy, "capacity")
    for name, rule in rules.items():
        if getattr(policy, name) is None:
            object.__setattr__(policy, name, rule(capacity) if isinstance(capacity, int) else 0)


class Policy:
    """A compression policy: what one layer's fixed number of slots holds.

    Subclasses are frozen dataclasses with a `capacity` (slots per layer, batch
    row and KV head) and a registry `name`, and implement `update`.
    """

    capacity: int
    name: ClassVar[str] = ""

    def resolve(self, spec: CacheSpec) -> tuple[Policy, ...]:
        """The policy of every layer of a model with cache `spec` (default: this one in each).

        The one hook through which model facts reach a policy; overridden by
        policies whose layers differ (PyramidKV's budgets, KVMerger's excluded
        layers) or that check the model (POD, DMC).
        """
        return (self,) * spec.num_layers

    @property
    def slots(self) -> int:
        """Static slot count of the layer this policy runs."""
        return self.capacity

    @property
    def kv_format(self):
        """How this layer stores k and v (a `kvjax.quant.SlotFormat`), or None: the model's dtype."""
        return None

    def init_state(self, spec: CacheSpec, layer: int, batch: int):
        """State this layer keeps beside its slots in `KVCache.state[layer]` (None: none)."""
        return None

    def check_batch(self, batch: int) -> None:
        """Raise if this policy was made for caches of another batch (a plan's byte budget)."""

    def check_length(self, tokens: int, what: str = "prompt + max_new_tokens") -> None:
        """Raise if this policy cannot serve `tokens` tokens (`what` they are), as a policy that never evicts."""

    def update(
        self,
        cache: KVCache,
        layer: int,
        q: Float[Array, "B S Hq D"],
        k: Float[Array, "B S H D"],
        v: Float[Array, "B S H D"],
        step: Step,
        attn: LayerAttention,
    ) -> tuple[Float[Array, "B S Hq D"], KVCache]:
        """Attend the chunk's pre-RoPE queries over layer `layer`, then compress the chunk into it.

        Reads and writes the layer's slots (`cache.layers[layer]`) and its state
        (`cache.state[layer]`); POD also reads the rings of earlier layers.
        Returns the attention output and the cache (the caller advances `seen`).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement update()")

    def _check_capacity(self) -> None:
        check_int(self, "capacity", self.capacity, 1)
