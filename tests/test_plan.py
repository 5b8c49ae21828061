"""Predefined capacity by memory budget (BCT, arXiv 2411.15785): plans that fit exactly,
clear errors, and memory/compilation independent of the context length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.plan import parse_bytes, plan_capacity, slot_bytes
from models import Llama, LlamaConfig
from tests.helpers import compiles_of, prefill_memory

CFG = LlamaConfig.tiny(num_layers=4)


@pytest.mark.parametrize("per_layer", ["uniform", "pyramid", [4, 1, 1, 2]])
@pytest.mark.parametrize("policy", ["bct", "h2o", "window", "dmc"])
def test_plan_fills_the_budget_exactly(per_layer, policy):
    """The plan counts every buffer, DMC's open-slot accumulators too."""
    budget = 3 * 2**20
    plan = plan_capacity(CFG, "3MiB", policy=policy, per_layer=per_layer, batch=2)
    cache = plan.init()
    per_slot = slot_bytes(CFG.cache_spec(), 2)
    assert cache.nbytes == plan.nbytes <= budget  # what is allocated is what was planned
    assert budget - plan.nbytes < (CFG.num_layers if per_layer == "uniform" else 1) * per_slot + 2 * per_slot
    assert cache.slots == plan.slots
    if per_layer == "pyramid":
        assert list(plan.slots) == sorted(plan.slots, reverse=True) and plan.slots[0] > plan.slots[-1]
    if isinstance(per_layer, list):
        np.testing.assert_allclose(np.array(plan.slots) / sum(plan.slots), np.array(per_layer) / 8, atol=1e-3)
    if not isinstance(per_layer, list):
        return
    # the policy really runs with these capacities
    model = Llama(CFG, rngs=nnx.Rngs(0))
    out = kvjax.generate(model, jnp.ones((2, 5), jnp.int32), policy=plan.policy(), max_new_tokens=2)
    assert out.cache.slots == plan.slots and out.cache.nbytes == plan.nbytes


def test_plan_by_tokens_and_sliding_layers():
    plan = plan_capacity(CFG, tokens=100, policy="bct")
    assert plan.slots == (100,) * 4 and plan.nbytes == plan.init().nbytes
    gemma_like = LlamaConfig.tiny(num_layers=3, sliding_window=8, layer_types=("sliding_attention", "sliding_attention", "full_attention"))
    plan = plan_capacity(gemma_like, 200_000, policy="h2o")
    assert plan.slots[:2] == (7, 7) and plan.slots[2] > 7  # windows are paid first, the rest goes to the global layer
    assert plan.init().nbytes == plan.nbytes <= 200_000


def test_budget_below_the_protected_tokens_names_the_minimum():
    spec = CFG.cache_spec()
    with pytest.raises(ValueError, match=r"protects 9 tokens per layer; the minimum budget is (\d+) bytes") as err:
        plan_capacity(CFG, "4KiB", policy="bct", sinks=4, window=4)
    minimum = int(err.value.args[0].split("minimum budget is ")[1].split(" ")[0])
    plan = plan_capacity(CFG, minimum, policy="bct", sinks=4, window=4)  # exactly the minimum works
    assert plan.slots == (9,) * 4 and plan.nbytes == minimum
    assert minimum == 4 + 9 * 4 * slot_bytes(spec, 1)


def test_plan_errors():
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes("2GB") == 2 * 10**9
    with pytest.raises(ValueError, match="exactly one of budget"):
        plan_capacity(CFG)
    with pytest.raises(ValueError, match="unknown policy 'lru'"):
        plan_capacity(CFG, "1MiB", policy="lru")
    with pytest.raises(ValueError, match="3 weights, the model has 4 layers"):
        plan_capacity(CFG, "1MiB", per_layer=[1, 2, 3])
    with pytest.raises(ValueError, match="pod takes one capacity for every layer"):
        plan_capacity(CFG, "1MiB", policy="pod", per_layer="pyramid")
    with pytest.raises(TypeError, match="needs a model, a model config or a CacheSpec"):
        plan_capacity("llama", "1MiB")


def test_pod_is_planned_by_its_measured_bytes():
    """POD's slots do not all cost the same (a block's lowest layer stores the distant keys):
    the plan is the largest capacity whose cache fits, and shared keys buy capacity."""
    alone = plan_capacity(CFG, "1MiB", policy="pod")
    shared = plan_capacity(CFG, "1MiB", policy="pod", owners=((0,),) * CFG.num_layers)
    for plan in (alone, shared):
        assert plan.init().nbytes == plan.nbytes <= 2**20
        bigger = kvjax.policies.make("pod", capacity=plan.capacities[0] + 1, **dict(plan.options))
        assert jax.eval_shape(lambda p=bigger: CFG.cache_spec().init(p, 1)).nbytes > 2**20  # the largest that fits
    assert shared.capacities[0] > alone.capacities[0]


@pytest.fixture(scope="module")
def tiny():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


def test_memory_is_independent_of_the_context_length(tiny):
    """Streaming 1k or 64k tokens through a 256-slot BCT cache: the compiled program's
    scratch memory differs only by the per-token inputs and outputs, and the cache is
    the planned bytes."""
    plan = plan_capacity(tiny, tokens=256, policy="bct")
    memory, run = prefill_memory(tiny, plan.policy(), (1024, 65536), chunk=128)
    (small_temp, small_out), (large_temp, large_out) = memory
    assert large_out == small_out
    assert large_temp - small_temp <= 5 * (65536 - 1024)  # token ids and mask only
    _, cache = run(jnp.ones((1, 1024), jnp.int32))
    assert cache.nbytes == plan.nbytes and int(cache.lengths().max()) == 256


def test_16k_tokens_with_256_slots_compile_once(tiny):
    with compiles_of("jit(_generate)") as compiles:
        policy = plan_capacity(tiny, tokens=256, policy="bct").policy()
        out = kvjax.generate(tiny, jnp.ones((1, 16), jnp.int32), policy=policy, max_new_tokens=16384, chunk_size=16)
    assert len(compiles) == 1
    assert int(out.lengths[0]) == 16384 and int(out.cache.seen[0]) >= 16384
    assert int(out.cache.lengths().max()) == 256 and float(out.cache.layers[0].score.sum()) == tiny.cfg.num_kv_heads * int(out.cache.seen[0])  # every token counted once
