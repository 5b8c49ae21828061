"""Different policies in different layers (e.g. per-layer capacities from `kvjax.plan_capacity`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvjax.policies.base import Policy


@dataclasses.dataclass(frozen=True)
class PerLayer(Policy):
    """Layer l runs `policies[l]` (as that policy resolves its layer l); `capacity` is the largest."""

    capacity: int
    policies: tuple[Policy, ...] = ()

    name = "per_layer"

    @classmethod
    def of(cls, policies: Sequence[Policy]) -> PerLayer:
        policies = tuple(policies)
        return cls(capacity=max(p.capacity for p in policies), policies=policies)

    def resolve(self, spec) -> tuple[Policy, ...]:
        if spec.num_layers != len(self.policies):
            raise ValueError(f"per-layer policy has {len(self.policies)} layers, the model has {spec.num_layers}")
        return tuple(p.resolve(spec)[i] for i, p in enumerate(self.policies))
