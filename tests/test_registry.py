"""Every registered policy (a third-party one too) works from its defaults through the four
entry points users reach first: generate, evaluate, plan_capacity and the demo."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import kvjax
from experiments import demo
from models import Llama, LlamaConfig

CAPACITY = 128  # at least every policy's protected tokens with default options


@pytest.fixture(scope="module")
def tiny():
    return Llama(LlamaConfig.tiny(num_layers=3, dmc_decisions=True), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", kvjax.policies.names())
def test_defaults_work_in_generate_evaluate_and_plans(tiny, name):
    policy = kvjax.policies.make(name, capacity=CAPACITY)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 100))
    out = kvjax.generate(tiny, ids, policy=policy, max_new_tokens=4, chunk_size=32)
    assert out.tokens.shape == (2, 4) and int(out.cache.lengths().max()) <= CAPACITY
    assert np.isfinite(kvjax.evaluate.perplexity(tiny, ids, policy=policy, chunk_size=32))
    plan = kvjax.plan_capacity(tiny.cfg, "512KiB", policy=name)
    cache = plan.init()
    assert cache.nbytes == plan.nbytes <= 512 * 2**10
    out = kvjax.generate(tiny, ids[:1], policy=plan.policy(), max_new_tokens=2, chunk_size=32)
    assert out.cache.nbytes == plan.nbytes


def test_the_demo_runs(capsys):
    """The main job's script end to end (every policy's generate and perplexity are the test above)."""
    names = ["full", "h2o", "kvmerger"]
    rows = demo.main(["--model", "tiny", "--capacity", str(CAPACITY), "--prompt-tokens", "160", "--new-tokens", "4",
                      "--eval-tokens", "16", "--chunk-size", "32", "--policies", *names])
    assert [r["policy"] for r in rows] == names
    assert all(np.isfinite(r["ppl"]) for r in rows)
    assert "first words generated after the prompt" in capsys.readouterr().out
