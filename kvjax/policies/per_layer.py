"""Different policies in different layers (e.g. sliding-window layers beside global ones)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvjax.policies.base import Policy


@dataclasses.dataclass(frozen=True)
class PerLayer(Policy):
    """Layer l runs `policies[l]`; `capacity` is the largest of them."""

    policies: tuple[Policy, ...] = ()

    name = "per_layer"

    @classmethod
    def of(cls, policies: Sequence[Policy]) -> "PerLayer":
        policies = tuple(policies)
        return cls(capacity=max(p.capacity for p in policies), policies=policies)

    def for_layer(self, layer: int) -> Policy:
        return self.policies[layer].for_layer(layer)  # nested per-layer policies resolve through

    def layer_slots(self, num_layers: int) -> tuple[int, ...]:
        if num_layers != len(self.policies):
            raise ValueError(f"per-layer policy has {len(self.policies)} layers, the model has {num_layers}")
        return tuple(p.layer_slots(num_layers)[i] for i, p in enumerate(self.policies))

    def init_state(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype) -> tuple:
        """Each layer's state from its own policy (None for a layer whose policy keeps none)."""
        states = [p.init_state(num_layers, batch, kv_heads, head_dim, dtype) for p in self.policies]
        return tuple(s[i] if s else None for i, s in enumerate(states)) if any(states) else ()
