"""Decode-step time against the memory-bandwidth bound, the policy's share of a step, and compressed vs full.

A decode step must read every weight and every cache buffer once, so its
floor is (weight bytes + cache bytes) / read bandwidth, with the bandwidth
measured in the same rounds as the steps (a jitted sum over 256 MiB takes its
turn among them; the median of its times).
For each model, context and batch, the cache a `context`-token prompt leaves
behind is built directly (random keys and values in the slots the policy
keeps; a step's cost depends on the slots it reads, not on how they were
filled) and single jitted steps are timed with the cache donated, all
configurations of a group round-robin so that drift hits all alike. Reported:

- `% bw`: the bandwidth bound over the measured step time;
- `policy %`: the share of the step that goes beyond `RingWrite` at the same
  capacity (attention over the slots, then a write at slot `seen % capacity`,
  no scores and no ranking): the cost of the policy's bookkeeping;
- `full / this`: how much faster than the full cache at the same context.

    python -m experiments.bench_decode [--model bench|smollm2-135m] [--contexts 1024 4096] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import random
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import kvjax
import models
from experiments.results import write_json
from kvjax import select
from kvjax.quant import FORMATS
from kvjax.policies.scorer import ScorerPolicy
from kvjax.run import forward_chunk
from models import Llama, LlamaConfig

BENCH_MODEL = LlamaConfig.tiny(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64)
PROBE_BYTES = 2**28  # what the bandwidth probe sums: 256 MiB, far more than the CPU's caches hold
POLICIES = ["full", "ring_write", "window", "streaming_llm", "h2o", "tova", "snapkv", "pyramidkv", "knorm",
            "kvmerger", "bct", "pod", "dmc"]


@dataclasses.dataclass(frozen=True)
class RingWrite(ScorerPolicy):
    """The floor a policy's bookkeeping is measured against (decode only, never a real policy):
    attention over the slots and the token, then the token written at slot `seen % capacity`."""

    name = "ring_write"

    def keep(self, lc, cand, score, rank, step):
        target = select.after(jnp.broadcast_to((step.seen % lc.slots)[:, None], lc.valid.shape[:2]), cand.written_after, lc.slots)
        stored = {name: select.write_slot(getattr(lc, name), target, new[:, :, 0]) for name, new in cand.new_as_stored().items()}
        return lc.replace(**stored, pos=select.write_slot(lc.pos, target, cand.pos[..., lc.slots]),
                          valid=select.write_slot(lc.valid, target, cand.valid[..., lc.slots]))


def make_policy(name: str, capacity: int, kv_dtype: str | None = None) -> kvjax.Policy:
    """The policy, its slots stored as `kv_dtype` if given (`kvjax.quant`)."""
    if name != "ring_write":
        return kvjax.policies.make(name, capacity=capacity, kv_dtype=kv_dtype)
    return RingWrite(capacity=capacity) if kv_dtype is None else kvjax.policies.Quantized(RingWrite(capacity=capacity), kv_dtype)


def bandwidth_probe(nbytes: int = PROBE_BYTES):
    """A runner timing one jitted sum over `nbytes` of f32: read bandwidth is `nbytes` over its time.
    It takes its turn in the round-robin with the decode steps, so the bound each step is held to is
    measured in the same minutes (this shared machine's read rate moved between 28 and 46 GB/s from
    one run to the next on 2026-12-08)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(nbytes // 4, np.float32))
    jsum = jax.jit(jnp.sum)
    jsum(x).block_until_ready()

    def run() -> float:
        start = time.perf_counter()
        jsum(x).block_until_ready()
        return time.perf_counter() - start

    return run


def weight_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


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


def load_model(source: str):
    return Llama(BENCH_MODEL, rngs=nnx.Rngs(0)) if source == "bench" else models.load(source)[0]


def time_round_robin(runners, steps: int) -> list[float]:
    """Median seconds per step of each runner, over `steps` rounds in a fresh random order each; each
    is timed on its second step, so the previous runner's cache misses don't count."""
    times = [[] for _ in runners]
    order = random.Random(0)
    for _ in tqdm(range(steps), desc="decode steps", unit="round", leave=False):
        for i in order.sample(range(len(runners)), len(runners)):
            runners[i]()
            times[i].append(runners[i]())
    return [statistics.median(t) for t in times]


def bench_group(model, policies, seen: int, batch: int, capacity: int, steps: int, kv_dtypes=(None,)) -> list[dict]:
    """Every policy (in every slot format) at one (context, batch): step time, bandwidth fraction
    (against the read bandwidth probed in the same rounds), policy share and speed-up over full
    (both against the same format)."""
    rows, runners = [], []
    configs = [(name, kv) for kv in kv_dtypes for name in policies]
    for name, kv in tqdm(configs, desc=f"compile {seen} tokens x {batch}", unit="policy", leave=False):
        policy = make_policy(name, seen + steps + 8 if name == "full" else capacity, kv)
        cache_bytes = jax.eval_shape(lambda: model.cache_spec().init(policy, batch)).nbytes
        rows.append(dict(policy=name, kv_dtype=kv or model.cache_spec().dtype, seen=seen, batch=batch, capacity=policy.capacity,
                         cache_bytes=cache_bytes))
        runners.append(decode_stepper(model, policy, seen, batch))
    probe = bandwidth_probe()
    *seconds, probe_seconds = time_round_robin(runners + [probe], steps)
    bandwidth = PROBE_BYTES / probe_seconds
    weights = weight_bytes(model)
    for r, t in zip(rows, seconds):
        r.update(step_ms=1e3 * t, read_bandwidth=bandwidth, bandwidth_fraction=(weights + r["cache_bytes"]) / bandwidth / t)
    by_name = {(r["policy"], r["kv_dtype"]): r for r in rows}
    for r in rows:
        ring, full = by_name.get(("ring_write", r["kv_dtype"])), by_name.get(("full", r["kv_dtype"]))
        if ring and r["policy"] not in ("full", "ring_write"):
            r["policy_share"] = 1 - ring["step_ms"] / r["step_ms"]
        if full:
            r["speedup_vs_full"] = full["step_ms"] / r["step_ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench", help="'bench' (a 4-layer model, random weights) or a models.load source")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--capacity", type=int, default=None,
                        help="slots of the compressed policies (default: a quarter of the context, at most 1024)")
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--kv-dtypes", nargs="+", default=[None], choices=list(FORMATS),
                        help="slot storage formats to time side by side (default: the model's dtype)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="results/bench_decode.json")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    print(f"weights {weight_bytes(model) / 2**20:.1f} MiB")
    rows = []
    for seen in args.contexts:
        for batch in args.batches:
            capacity = args.capacity or min(seen // 4, 1024)
            rows += bench_group(model, args.policies, seen, batch, capacity, args.steps, args.kv_dtypes)

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print(f"{'policy':<14} {'slots as':>8} {'seen':>6} {'batch':>5} {'slots':>6} {'cache MiB':>9} {'step ms':>8} {'% bw':>5} {'policy %':>8} {'full/this':>9} {'GB/s':>5}")
    for r in rows:
        share = r.get("policy_share")
        print(f"{r['policy']:<14} {r['kv_dtype']:>8} {r['seen']:>6} {r['batch']:>5} {r['capacity']:>6} {r['cache_bytes'] / 2**20:>9.1f} {r['step_ms']:>8.2f} "
              f"{100 * r['bandwidth_fraction']:>5.0f} {fmt(None if share is None else 100 * share, '>8.0f')} "
              f"{fmt(r.get('speedup_vs_full'), '>9.2f')} {r['read_bandwidth'] / 1e9:>5.1f}")
    meta = dict(model=args.model, device=str(jax.devices()[0]), machine=platform.machine(), jax=jax.__version__,
                steps=args.steps, weight_bytes=weight_bytes(model))
    write_json(args.out, dict(meta=meta, rows=rows))
    return rows


if __name__ == "__main__":
    main()
