"""Policy registry (`names()`, `options(name)`, `make(name, capacity=..., **options)`,
`register`) and `resolve`, the one step that binds a policy to a model.

An entry is a policy class or a factory function; `make` checks the options
against its signature. Every policy also takes `kv_dtype` (its slots' storage
format, `kvjax.quant`): `make("h2o", capacity=256, kv_dtype="int8")` is
`Quantized(H2O(...), "int8")`, and `kv_dtype="int4"` / `"int2"` is KIVI's `Kivi(H2O(...), "int4")`. Shorthand options that compose parts stay available:
`make("streaming_llm", rerotate=True)` is `KeyRerotation(StreamingLLM(...))`,
`make("pod", select="snapkv")` is POD with the SnapKV-voted ring.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from kvjax.policies.base import Policy, Step
from kvjax.policies.bct import BCT
from kvjax.policies.dmc import DMC
from kvjax.policies.full import Full
from kvjax.policies.h2o import H2O
from kvjax.policies.kivi import Kivi
from kvjax.policies.knorm import KNorm
from kvjax.policies.kvmerger import KVMerger
from kvjax.policies.merging import MergingPolicy
from kvjax.policies.per_layer import PerLayer
from kvjax.policies.pod import POD, NewestRing, SnapKVRing
from kvjax.policies.pyramidkv import PyramidKV, pyramid_budgets
from kvjax.policies.quantized import Quantized
from kvjax.policies.random import Random
from kvjax.policies.scorer import Candidates, KeyRerotation, ScorerPolicy
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.tova import TOVA
from kvjax.policies.window import StreamingLLM, Window
from kvjax.quant import slot_format

REGISTRY: dict[str, Callable[..., Policy]] = {}


def register(factory: Callable[..., Policy] | None = None, *, name: str | None = None):
    """Register a policy class (under its `name`) or a factory `f(capacity, **options)`;
    usable as a decorator. Re-registering a name replaces it."""

    def add(f):
        key = name or getattr(f, "name", "") or f.__name__
        if not isinstance(key, str) or not key:
            raise ValueError(f"register: {f!r} has no name; pass register(..., name='my_policy')")
        REGISTRY[key] = f
        return f

    return add if factory is None else add(factory)


def names() -> list[str]:
    """Registered policy names."""
    return sorted(REGISTRY)


def _lookup(name: str) -> Callable[..., Policy]:
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(names())}")
    return REGISTRY[name]


def options(name: str) -> list[str]:
    """Options `make` accepts for a policy (besides capacity); `kv_dtype` is every policy's."""
    return [p for p in inspect.signature(_lookup(name)).parameters if p != "capacity"] + ["kv_dtype"]


def make(name: str, capacity: int, kv_dtype: str | None = None, **kwargs) -> Policy:
    """Build a policy by registry name, e.g. `make("h2o", capacity=256, window=64)`; with
    `kv_dtype` ("int8", "fp8", "bfloat16", "float32", "int4", "int2") its slots are stored in that format."""
    factory = _lookup(name)
    unknown = sorted(set(kwargs) - set(options(name)))
    if unknown:
        raise TypeError(f"policy {name!r} takes no option(s) {unknown}; its options are {options(name)}")
    return stored_as(factory(capacity=capacity, **kwargs), kv_dtype)


def stored_as(policy: Policy | None, kv_dtype: str | None) -> Policy | None:
    """`policy` with its slots stored as `kv_dtype` (`Quantized`, or `Kivi` for KIVI's int4 / int2);
    None leaves it as it is. The one
    `kv_dtype=` option of `make`, `generate` and `kvjax.evaluate`."""
    if kv_dtype is None or policy is None:
        return policy
    if isinstance(policy, Quantized):
        if policy.kv_dtype != kv_dtype:
            raise ValueError(f"{policy.name} already stores its slots as {policy.kv_dtype}; drop kv_dtype={kv_dtype!r} "
                             f"or pass the unwrapped policy ({policy.name}.inner)")
        return policy
    return (Kivi if slot_format(kv_dtype).grouped else Quantized)(policy, kv_dtype)


def resolve(policy: Policy, spec) -> tuple[Policy, ...]:
    """The policy of every layer of a model with cache `spec`, bound to it (`Policy.resolve`).

    Sliding-window layers (a window of w tokens, the current one included) run
    the `window` policy with capacity w - 1, in the policy's slot format; the
    given policy runs the others.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a kvjax Policy (see kvjax.policies.make), got {type(policy).__name__}")
    layers = policy.resolve(spec)
    windows = spec.sliding_windows or (None,) * spec.num_layers

    def sliding(p: Policy, w: int) -> Policy:
        fmt = p.kv_format
        if fmt is not None and (w - 1) % fmt.slot_multiple:
            raise ValueError(f"{fmt.name}: every layer's slots must be a multiple of the group ({fmt.slot_multiple}), but this "
                             f"model's sliding-window layers hold {w - 1}; store them as int8 or fp8")
        return stored_as(Window(capacity=w - 1), None if fmt is None else fmt.name)

    return tuple(p if w is None else sliding(p, w) for p, w in zip(layers, windows, strict=True))


def streaming_llm(capacity: int, sinks: int = 4, window: int | None = None, rerotate: bool = False) -> Policy:
    """StreamingLLM; `rerotate=True` is `KeyRerotation(StreamingLLM(...))`, the paper's convention."""
    policy = StreamingLLM(capacity=capacity, sinks=sinks, window=window)
    return KeyRerotation(policy) if rerotate else policy


def window(capacity: int, rerotate: bool = False) -> Policy:
    """The last `capacity` tokens; `rerotate=True` wraps it in `KeyRerotation`."""
    policy = Window(capacity=capacity)
    return KeyRerotation(policy) if rerotate else policy


def pod(capacity: int, sinks: int = 16, window: int | None = None, owners=None, select: str | None = None,
        select_window: int = 64, select_kernel: int = 5) -> Policy:
    """POD; `select="snapkv"` chooses the distant ring by SnapKV's votes (POD + SnapKV)."""
    if select not in (None, "snapkv"):
        raise ValueError(f"pod: select must be None or 'snapkv', got {select!r}")
    ring = NewestRing() if select is None else SnapKVRing(window=select_window, kernel=select_kernel)
    return POD(capacity=capacity, sinks=sinks, window=window, owners=owners, ring=ring)


for _entry in (Full, H2O, TOVA, SnapKV, PyramidKV, KNorm, Random, BCT, KVMerger, DMC):
    register(_entry)
register(window, name="window")
register(streaming_llm, name="streaming_llm")
register(pod, name="pod")

__all__ = [
    "BCT", "Candidates", "DMC", "Full", "H2O", "Kivi", "KNorm", "KVMerger", "KeyRerotation", "MergingPolicy", "NewestRing", "POD",
    "PerLayer", "Policy", "PyramidKV", "Quantized", "Random", "ScorerPolicy", "SnapKV", "SnapKVRing", "Step", "StreamingLLM", "TOVA",
    "Window", "make", "names", "options", "pyramid_budgets", "register", "resolve", "stored_as",
]
