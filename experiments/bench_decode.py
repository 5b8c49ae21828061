"""Decode-step time and cache bytes versus tokens already seen.

For `full` (cache grows with the context) and fixed-capacity policies, build
the decode state a long context leaves behind (a cache holding `seen` tokens,
or `capacity` of them, filled with random keys/values and scores) and time
single jitted decode steps with the cache donated. Everything is measured in
the same run, and each fixed-capacity row is reported as a ratio to its own
1k-token time (flatness) and to `full` at the same context (speed-up).

    python -m experiments.bench_decode [--contexts 1024 4096 16384 65536] [--out results/bench_decode.json]
"""

from __future__ import annotations

import argparse
import functools
import platform
import random
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from experiments.results import write_json

import kvjax
from kvjax.run import forward_chunk
from models import Llama, LlamaConfig

BENCH_MODEL = LlamaConfig.tiny(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64)


def filled_cache(model: Llama, policy: kvjax.Policy, seen: int, key, batch: int = 1) -> kvjax.KVCache:
    """The cache after `seen` tokens in each of `batch` rows: each layer holds the last tokens it has room for."""
    cache = model.cache_spec().init(policy, batch=batch)

    def fill(lc: kvjax.cache.LayerCache, key) -> kvjax.cache.LayerCache:
        n = min(seen, lc.slots)
        kk, kv, ks = jax.random.split(key, 3)
        valid = jnp.broadcast_to(jnp.arange(lc.slots) < n, lc.valid.shape)
        pos = jnp.where(valid, jnp.arange(lc.slots) + seen - n, -1).astype(jnp.int32)
        return lc.replace(
            k=jnp.where(valid[..., None], jax.random.normal(kk, lc.k.shape), 0.0).astype(lc.k.dtype),
            v=jnp.where(valid[..., None], jax.random.normal(kv, lc.v.shape), 0.0).astype(lc.v.dtype),
            pos=pos, valid=valid, score=jnp.where(valid, jax.random.uniform(ks, lc.score.shape), 0.0),
        )

    keys = jax.random.split(key, cache.num_layers)
    return cache.replace(layers=tuple(fill(lc, k) for lc, k in zip(cache.layers, keys)), seen=jnp.full((batch,), seen, jnp.int32))


def decode_stepper(model: Llama, policy: kvjax.Policy, seen: int, batch: int = 1):
    """A closure running one jitted decode step (model + attention + policy
    update, cache donated) on the state `seen` tokens leave behind in `batch` rows."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, cache, token, key):
        m = nnx.merge(graphdef, state)
        hidden, cache = forward_chunk(m, token, jnp.ones_like(token, bool), cache, key, prefill=False)
        return jnp.argmax(m.logits(hidden[:, 0]), -1)[:, None].astype(jnp.int32), cache

    carry = dict(cache=filled_cache(model, policy, seen, jax.random.key(seen), batch), token=jnp.ones((batch, 1), jnp.int32))
    key = jax.random.key(0)

    def run() -> float:
        start = time.perf_counter()
        carry["token"], carry["cache"] = step(state, carry["cache"], carry["token"], key)
        carry["token"].block_until_ready()
        return time.perf_counter() - start

    for _ in range(3):  # compile and warm up
        run()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--capacity", type=int, default=1024)
    parser.add_argument("--policies", nargs="+", default=["full", "window", "h2o"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="results/bench_decode.json")
    args = parser.parse_args(argv)

    model = Llama(BENCH_MODEL, rngs=nnx.Rngs(0))
    rows, runners = [], []
    jobs = [(name, seen) for name in args.policies for seen in args.contexts]
    for name, seen in tqdm(jobs, desc="compile", unit="config"):
        capacity = seen + args.steps + 8 if name == "full" else args.capacity
        policy = kvjax.policies.make(name, capacity=capacity)
        rows.append(dict(policy=name, seen=seen, capacity=capacity, cache_bytes=model.cache_spec().init(policy, 1).nbytes))
        runners.append(decode_stepper(model, policy, seen))
    # Rounds over all configurations in a fresh random order each, so drift in
    # machine load and the memory traffic of a large neighbour hit all alike;
    # each is timed on its second step so the previous one's cache misses don't count.
    times = [[] for _ in runners]
    order = random.Random(0)
    for _ in tqdm(range(args.steps), desc="decode steps", unit="round"):
        for i in order.sample(range(len(runners)), len(runners)):
            runners[i]()
            times[i].append(runners[i]())
    for r, t in zip(rows, times):
        r["step_ms"] = 1e3 * statistics.median(t)

    base = {r["policy"]: r["step_ms"] for r in rows if r["seen"] == args.contexts[0]}
    full = {r["seen"]: r["step_ms"] for r in rows if r["policy"] == "full"}
    for r in rows:
        r["vs_first_context"] = r["step_ms"] / base[r["policy"]]
        r["speedup_vs_full"] = full[r["seen"]] / r["step_ms"] if r["seen"] in full else None

    header = f"{'policy':<8} {'seen':>7} {'slots':>7} {'cache MiB':>10} {'step ms':>8} {'/ 1k':>6} {'full / this':>11}"
    print(header)
    for r in rows:
        speedup = f"{r['speedup_vs_full']:.2f}" if r["speedup_vs_full"] else "-"
        print(f"{r['policy']:<8} {r['seen']:>7} {r['capacity']:>7} {r['cache_bytes'] / 2**20:>10.2f} {r['step_ms']:>8.3f} {r['vs_first_context']:>6.2f} {speedup:>11}")
    meta = dict(model=BENCH_MODEL.__dict__, device=str(jax.devices()[0]), machine=platform.machine(), jax=jax.__version__, steps=args.steps)
    write_json(args.out, dict(meta=meta, rows=rows))
    return rows


if __name__ == "__main__":
    main()
