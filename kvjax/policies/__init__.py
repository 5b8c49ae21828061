"""Policy registry: `names()` and `make(name, capacity=..., **options)`."""

from __future__ import annotations

import dataclasses

from kvjax.policies.base import Candidates, Policy, Step
from kvjax.policies.bct import BCT
from kvjax.policies.dmc import DMC
from kvjax.policies.full import Full
from kvjax.policies.h2o import H2O
from kvjax.policies.knorm import KNorm
from kvjax.policies.kvmerger import KVMerger
from kvjax.policies.per_layer import PerLayer
from kvjax.policies.pod import POD
from kvjax.policies.pyramidkv import PyramidKV, pyramid_budgets
from kvjax.policies.random import Random
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.tova import TOVA
from kvjax.policies.window import StreamingLLM, Window

REGISTRY: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Full, Window, StreamingLLM, H2O, TOVA, SnapKV, PyramidKV, KNorm, Random, BCT, KVMerger, POD, DMC)
}


def names() -> list[str]:
    """Registered policy names."""
    return sorted(REGISTRY)


def options(name: str) -> list[str]:
    """Options `make` accepts for a policy (besides capacity)."""
    return [f.name for f in dataclasses.fields(_lookup(name)) if f.name != "capacity"]


def _lookup(name: str) -> type[Policy]:
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(names())}")
    return REGISTRY[name]


def make(name: str, capacity: int, **kwargs) -> Policy:
    """Build a policy by registry name, e.g. `make("h2o", capacity=256, window=64)`."""
    cls = _lookup(name)
    unknown = sorted(set(kwargs) - set(options(name)))
    if unknown:
        raise TypeError(f"policy {name!r} takes no option(s) {unknown}; its options are {options(name)}")
    return cls(capacity=capacity, **kwargs)


__all__ = ["Candidates", "PerLayer", "Policy", "Step", "make", "names", "options", "pyramid_budgets", *[c.__name__ for c in REGISTRY.values()]]
