"""The throughput a compressed cache buys: the largest batch each policy fits in a cache budget, and decode tokens/s by batch.

For each policy, `kvjax.plan_capacity` gives the slots a budget of cache bytes
per device holds at a batch; the largest batch whose plan still holds the
policy's capacity (the whole context for `full`) is the batch that policy
fits. Then decode steps are timed on SmolLM2-135M for batches 1..32 with the
cache a `context`-token prompt leaves behind (random keys and values in every
slot the policy keeps: a decode step's cost depends on the slots it reads,
not on how they were filled), the cache donated, tokens/s = batch / step time.
Batches past a policy's fit are marked, and still timed where memory allows.

On CPU (and on simulated devices) this measures memory and the scaling of
work, not accelerator speed; run it on a GPU or TPU for throughput.

    python -m experiments.bench_batch [--model smollm2-135m] [--context 4096] [--capacity 512] [--budget 1GiB]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import jax
from flax import nnx
from tqdm import tqdm

import kvjax
import models
from experiments.bench_decode import decode_stepper
from experiments.results import write_json
from kvjax.plan import parse_bytes
from models import Llama, LlamaConfig


def largest_batch(model, policy: str, capacity: int, budget: int, limit: int = 4096) -> int:
    """The largest batch whose `plan_capacity` under `budget` bytes still gives every global layer `capacity` slots (0: none)."""
    fits = 0
    for batch in range(1, limit + 1):
        try:
            plan = kvjax.plan_capacity(model, budget, policy=policy, batch=batch)
        except ValueError:  # the budget cannot hold even the tokens the policy protects
            break
        if min(plan.slots) < capacity:
            break
        fits = batch
    return fits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models.load source, or 'tiny' (random weights, quick)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--capacity", type=int, default=512, help="slots of the compressed policies")
    parser.add_argument("--policies", nargs="+", default=["full", "h2o", "snapkv"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--budget", default="1GiB", help="cache bytes per device")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="results/bench_batch.json")
    args = parser.parse_args(argv)

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)) if args.model == "tiny" else models.load(args.model)[0]
    budget = parse_bytes(args.budget)
    rows = []
    for name in args.policies:
        capacity = args.context + args.steps + 8 if name == "full" else args.capacity
        fits = largest_batch(model, name, capacity, budget)
        policy = kvjax.policies.make(name, capacity=capacity)
        for batch in tqdm(args.batches, desc=name, unit="batch"):
            step = decode_stepper(model, policy, args.context, batch)
            seconds = statistics.median(step() for _ in range(args.steps))
            rows.append(dict(policy=name, capacity=capacity, batch=batch, fits_budget=batch <= fits, largest_batch=fits,
                             cache_bytes=jax.eval_shape(lambda: model.cache_spec().init(policy, batch)).nbytes,
                             step_ms=1e3 * seconds, tokens_per_s=batch / seconds))
    print(f"cache budget {args.budget} per device, context {args.context}: largest batch "
          + ", ".join(f"{n} {next(r['largest_batch'] for r in rows if r['policy'] == n)}" for n in args.policies))
    print(f"{'policy':<8} {'slots':>6} {'batch':>6} {'cache MiB':>10} {'step ms':>9} {'tokens/s':>9}  fits")
    for r in rows:
        print(f"{r['policy']:<8} {r['capacity']:>6} {r['batch']:>6} {r['cache_bytes'] / 2**20:>10.1f} {r['step_ms']:>9.1f} "
              f"{r['tokens_per_s']:>9.1f}  {'yes' if r['fits_budget'] else 'no'}")
    meta = dict(model=args.model, context=args.context, budget=args.budget, device=str(jax.devices()[0]), devices=jax.device_count(),
                machine=platform.machine(), jax=jax.__version__, steps=args.steps)
    write_json(args.out, dict(meta=meta, rows=rows))
    return rows


if __name__ == "__main__":
    main()
