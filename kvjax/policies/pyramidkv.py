"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV with budgets shrinking with depth.

`capacity` is the average budget per layer (observation window included), the
same as SnapKV's uniform budget. With beta (default 20, as the official code):
    lo = capacity / beta,  hi = 2 * capacity - lo,
    budget_l = round(hi - l * (hi - lo) / (L - 1)),
so budgets fall linearly and average `capacity` (before rounding). As in
kvpress, when lo < window the pyramid cannot hold the window in its top layer
and the budgets fall back to uniform (with a warning). Resolved against a
model, layer l runs SnapKV with capacity budget_l, so the memory really follows
the pyramid; L is the model's layer count (`num_layers`, if given, must match it).
"""

from __future__ import annotations

import dataclasses
import warnings

from kvjax.policies.snapkv import SnapKV


def pyramid_budgets(capacity: int, window: int, num_layers: int, beta: float) -> tuple[int, ...]:
    """Per-layer budgets of the PyramidKV schedule (uniform if it cannot hold the window)."""
    if num_layers == 1:
        return (capacity,)
    lo = capacity / beta
    hi = 2 * capacity - lo
    if lo < window:
        warnings.warn(
            f"pyramidkv: the top layer's budget capacity/beta = {lo:g} cannot hold the observation "
            f"window ({window}); using uniform budgets of {capacity} (raise capacity to "
            f"{int(window * beta)} or lower beta for a pyramid)",
            stacklevel=3,
        )
        return (capacity,) * num_layers
    step = (hi - lo) / (num_layers - 1)
    return tuple(int(round(hi - layer * step)) for layer in range(num_layers))


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    num_layers: int = 0  # 0: the model's
    beta: float = 20.0

    name = "pyramidkv"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"pyramidkv: num_layers must be the model's layer count (or 0 to take it from the model), got {self.num_layers!r}")
        if not self.beta >= 1:
            raise ValueError(f"pyramidkv: beta must be >= 1, got {self.beta!r}")

    def budgets(self, num_layers: int) -> tuple[int, ...]:
        return pyramid_budgets(self.capacity, self.window, num_layers, self.beta)

    def resolve(self, spec):
        if self.num_layers and self.num_layers != spec.num_layers:
            raise ValueError(f"pyramidkv was made for num_layers={self.num_layers}, the model has {spec.num_layers}")
        return tuple(SnapKV(capacity=b, sinks=self.sinks, window=self.window, kernel=self.kernel) for b in self.budgets(spec.num_layers))
