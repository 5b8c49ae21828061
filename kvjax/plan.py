"""Predefined KV-cache capacity from a memory budget (BCT, arXiv 2411.15785).

A model is built with a cache whose size is fixed before the first token: given
a byte budget (or a token count), `plan_capacity` returns the slots of every
layer so that the cache `init` allocates holds exactly `plan.nbytes <= budget`
bytes, spread uniformly, as a PyramidKV schedule, or by a profile (e.g. the
per-layer merge ratios of `kvjax.policies.kvmerger.profile`). Sliding-window
layers keep their fixed window and are paid for first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kvjax import calibrate, policies
from kvjax.cache import KVCache
from kvjax.policies.base import Policy
from kvjax.policies.per_layer import PerLayer
from kvjax.policies.pyramidkv import pyramid_budgets
from kvjax.protocol import CacheSpec
from kvjax.quant import SlotFormat

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(budget: int | str) -> int:
    """'256MiB', '1.5GB', '4096' or an int -> bytes."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        return budget
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"budget {budget!r} is not a size: write e.g. 268435456, '256MiB' or '1.5GB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def slot_bytes(spec: CacheSpec, batch: int, fmt: SlotFormat | None = None) -> int:
    """Bytes one slot costs in one layer: k and v (in the model's dtype, or stored in `fmt` with
    its scales), plus pos (int32), valid (bool), score (f32) per KV head."""
    kv = 2 * spec.head_dim * jnp.dtype(spec.dtype).itemsize if fmt is None else fmt.bytes_per_slot(spec.head_dim)
    return batch * spec.kv_heads * (kv + 4 + 1 + 4)


class BudgetTooSmall(ValueError):
    """A byte budget below what the policy's protected tokens (and its format's fixed parts) need;
    the message names the minimum."""


@dataclasses.dataclass(frozen=True)
class Planned(Policy):
    """A policy sized by `plan_capacity` for `batch` rows: its cache holds `nbytes` bytes only for that batch."""

    inner: Policy
    batch: int
    nbytes: int

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def resolve(self, spec) -> tuple[Policy, ...]:
        return self.inner.resolve(spec)

    def check_batch(self, batch: int) -> None:
        if batch != self.batch:
            raise ValueError(
                f"this {self.name} policy was planned for batch={self.batch} ({self.nbytes} bytes); a cache for "
                f"batch={batch} would take {batch / self.batch:g}x that budget. Plan again: "
                f"kvjax.plan_capacity(..., batch={batch})"
            )


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    """Slots per layer for a policy, and the bytes the cache will hold."""

    spec: CacheSpec
    slots: tuple[int, ...]
    batch: int
    policy_name: str
    options: tuple[tuple[str, object], ...]
    nbytes: int
    capacities: tuple[int, ...] | None = None  # the policy's capacity per layer, where it differs from `slots` (POD)

    @property
    def kv_dtype(self) -> str:
        """The slots' storage format (`kvjax.quant`)."""
        return dict(self.options).get("kv_dtype") or self.spec.dtype

    def policy(self) -> Policy:
        """The policy with each global layer's capacity, for caches of `batch` rows (another
        batch would not fit the budget: building its cache raises)."""
        fixed = self.spec.sliding_windows or (None,) * self.spec.num_layers
        make = lambda c: policies.make(self.policy_name, capacity=c, **dict(self.options))  # noqa: E731
        capacities = self.capacities or self.slots
        global_caps = {c for c, w in zip(capacities, fixed) if w is None}
        if len(global_caps) == 1:
            return Planned(make(next(iter(global_caps))), self.batch, self.nbytes)
        # kvjax.policies.resolve puts window caches on sliding layers; the largest policy stands in there
        top = max(global_caps)
        return Planned(PerLayer.of(make(c if w is None else top) for c, w in zip(capacities, fixed)), self.batch, self.nbytes)

    def init(self) -> KVCache:
        cache = self.spec.init(self.policy(), self.batch)
        assert cache.nbytes == self.nbytes, (cache.nbytes, self.nbytes)
        return cache


def _spec(model) -> CacheSpec:
    if isinstance(model, CacheSpec):
        return model
    if hasattr(model, "cache_spec"):
        return model.cache_spec()
    raise TypeError(f"plan_capacity needs a model, a model config or a CacheSpec (with .cache_spec()), got {type(model).__name__}")


def _measured_format(model, spec: CacheSpec, calibration, max_nll_shift: float, chunk: int) -> str | None:
    """kv_dtype="auto": the narrowest format within `max_nll_shift` on the calibration text (None: the model's dtype)."""
    if calibration is None or not hasattr(model, "logits"):
        raise ValueError('plan_capacity: kv_dtype="auto" measures each format on text: pass the model itself (not its '
                         "config) and calibration=<token ids>, e.g. 512 tokens like your task's")
    chosen = calibrate.narrowest_format(calibrate.format_shifts(model, calibration, chunk_size=chunk), max_nll_shift, spec.dtype,
                                        spec.head_dim)
    return None if chosen == spec.dtype else chosen


def _split(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder split of `total` slots in proportion to `weights`."""
    weights = [float(w) for w in weights]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"per-layer profile must be non-negative with a positive sum, got {weights}")
    exact = [total * w / sum(weights) for w in weights]
    slots = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: slots[i] - exact[i])[: total - sum(slots)]:
        slots[i] += 1
    return slots


def _min_slots(policy: str, options: dict) -> int:
    """Smallest capacity the policy accepts (its protected tokens may depend on the capacity)."""
    def fits(c: int) -> bool:
        try:
            policies.make(policy, capacity=c, **options)
            return True
        except ValueError:
            return False

    lo, hi = 1, 2**24
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def plan_capacity(
    model,
    budget: int | str | None = None,
    *,
    tokens: int | None = None,
    policy: str = "window",
    per_layer: str | Sequence[float] = "uniform",
    batch: int = 1,
    beta: float = 20.0,
    calibration=None,
    max_nll_shift: float = 0.01,
    calibration_chunk: int = 64,
    **options,
) -> CapacityPlan:
    """Per-layer capacities for `policy` that fit `budget` bytes (or `tokens` slots per global layer).

    per_layer: "uniform"; "pyramid" (PyramidKV's linear schedule with `beta`,
    averaging the uniform capacity); or one weight per layer (a profile).
    Options are passed to the policy; `kv_dtype="int8"` (or "fp8", "bfloat16") stores the
    slots in that format (`kvjax.quant`), scales counted, so the same bytes buy more of them.
    `kv_dtype="auto"` measures every format on `calibration` token ids (the model itself, not
    a config) and takes the one with the fewest bytes per slot that moves the per-token NLL by
    at most `max_nll_shift` nats on average (`kvjax.calibrate.narrowest_format`), streaming
    the text in chunks of `calibration_chunk` tokens.
    Raises if the budget cannot hold the tokens the policy protects, naming the minimum budget.
    """
    spec = _spec(model)
    if (budget is None) == (tokens is None):
        raise ValueError("plan_capacity: give exactly one of budget=<bytes or '256MiB'> or tokens=<slots per layer>")
    if options.get("kv_dtype") == "auto":
        options["kv_dtype"] = _measured_format(model, spec, calibration, max_nll_shift, calibration_chunk)
    probe = policies.make(policy, capacity=2**24, **options)  # unknown names and options fail here, by name
    if isinstance(getattr(probe, "inner", probe), policies.POD):  # also stored quantized
        return _plan_by_bytes(spec, budget, tokens, policy, per_layer, batch, options)
    layers = policies.resolve(probe, spec)
    state = jax.eval_shape(lambda: [p.init_state(spec, i, batch) for i, p in enumerate(layers)])
    windows = spec.sliding_windows or (None,) * spec.num_layers
    per_slot = slot_bytes(spec, batch, probe.kv_format)
    fixed = sum(w - 1 for w in windows if w is not None) * per_slot + 4 * batch  # window layers + `seen`
    fixed += sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(state))  # policy state beside the slots (DMC's)
    globals_ = [i for i, w in enumerate(windows) if w is None]
    minimum = _min_slots(policy, options)
    if budget is not None:
        budget_bytes = parse_bytes(budget)
        total = (budget_bytes - fixed) // per_slot
    else:
        budget_bytes, total = None, tokens * len(globals_)
    if isinstance(per_layer, str):
        if per_layer == "uniform":
            global_slots = [total // len(globals_)] * len(globals_)
        elif per_layer == "pyramid":
            mean = total // len(globals_)
            global_slots = list(pyramid_budgets(mean, minimum, len(globals_), beta)) if mean >= minimum else [mean] * len(globals_)
            while sum(global_slots) > total:  # rounding can overshoot by a slot or two
                global_slots[global_slots.index(max(global_slots))] -= 1
        else:
            raise ValueError(f"per_layer must be 'uniform', 'pyramid' or one weight per layer, got {per_layer!r}")
    else:
        if len(per_layer) != spec.num_layers:
            raise ValueError(f"per_layer profile has {len(per_layer)} weights, the model has {spec.num_layers} layers")
        global_slots = _split(total, [per_layer[i] for i in globals_])
    multiple = 1 if probe.kv_format is None else probe.kv_format.slot_multiple  # KIVI's key groups: whole ones only
    if budget is None and tokens % multiple:
        raise ValueError(f"plan_capacity: {probe.kv_format.name} slots come in groups of {multiple}; "
                         f"tokens={tokens} is not a multiple of {multiple}")
    global_slots = [s - s % multiple for s in global_slots]
    if min(global_slots) < minimum:
        need = fixed + -(-minimum // multiple) * multiple * len(globals_) * per_slot
        raise BudgetTooSmall(
            f"plan_capacity: {budget if budget is not None else f'tokens={tokens}'} leaves {min(global_slots)} slots in a layer, "
            f"but {policy} protects {minimum} tokens per layer; the minimum budget is {need} bytes "
            f"({need / 2**20:.3f} MiB) for batch={batch}"
        )
    slots = list(w - 1 if w is not None else 0 for w in windows)
    for i, s in zip(globals_, global_slots):
        slots[i] = s
    nbytes = fixed + sum(global_slots) * per_slot
    return CapacityPlan(spec, tuple(slots), batch, policy, tuple(sorted(options.items())), nbytes)


def _plan_by_bytes(spec: CacheSpec, budget, tokens, policy: str, per_layer, batch: int, options: dict) -> CapacityPlan:
    """One capacity for every layer, the largest whose cache fits the budget, its bytes measured
    (`jax.eval_shape`, nothing allocated): for policies whose slots do not all cost the same
    (POD: only a block's lowest layer stores distant keys, so the ring's cost depends on the blocks)."""
    if per_layer != "uniform":
        raise ValueError(f"plan_capacity: {policy} takes one capacity for every layer; use per_layer='uniform'")
    make = lambda c: policies.make(policy, capacity=c, **options)  # noqa: E731
    cost = lambda c: jax.eval_shape(lambda: spec.init(make(c), batch)).nbytes  # noqa: E731
    minimum = _min_slots(policy, options)
    if tokens is not None:
        capacity = tokens
    else:
        budget_bytes, need = parse_bytes(budget), cost(minimum)
        if need > budget_bytes:
            raise BudgetTooSmall(
                f"plan_capacity: {budget} cannot hold the {minimum} slots {policy} needs per layer; the minimum budget is "
                f"{need} bytes ({need / 2**20:.3f} MiB) for batch={batch}"
            )
        lo, hi = minimum, 2**24
        while lo < hi:  # the largest capacity that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= budget_bytes else (lo, mid - 1)
        capacity = lo
    cache = jax.eval_shape(lambda: spec.init(make(capacity), batch))
    windows = spec.sliding_windows or (None,) * spec.num_layers
    return CapacityPlan(spec, cache.slots, batch, policy, tuple(sorted(options.items())), cache.nbytes,
                        capacities=tuple(capacity if w is None else w - 1 for w in windows))
