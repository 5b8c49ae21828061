"""Attention-over-the-cache time: Pallas kernels against the XLA path, as bytes/s.

For decode (one query token per sequence, split over the capacity) and a
prefill chunk, time `pallas_kernels.cache_attention` (GPU/TPU only; interpret
mode is excluded) and kvjax's XLA path (`cache_attention_xla`) on the same inputs, and report the
bytes each must read (K, V, masks, queries) per second next to the device's
copy bandwidth measured in the same run (read + write of a 256 MiB buffer),
and the achieved FLOP/s (prefill chunks are compute-bound).
Half of the slots are valid, spread over the whole capacity (holes after
eviction), so neither the kernels nor the XLA path can skip slots.

    python -m experiments.bench_kernels [--capacities 1024 4096 16384] [--out results/bench_kernels.json]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.results import write_json

from pallas_kernels import cache_attention, cache_attention_xla


def timer(fn, *args, repeats: int) -> float:
    """Median seconds of a jitted call (after two warm-up calls)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes/s of a device copy (counts the read and the write)."""
    x = jnp.ones((64 * 2**20,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    return 2 * x.nbytes / timer(copy, x, repeats=repeats)


def kernel_bytes_written(*args, **kwargs) -> int:
    """Bytes the Pallas kernels of one `cache_attention(*args, **kwargs)` call write to memory,
    from their output shapes (interpreted tracing: no device needed). With the statistic, the
    mass pass writes [B, H, keys] floats; the path before it wrote the logits [B, H, rows, keys]."""
    jaxpr = jax.make_jaxpr(functools.partial(cache_attention, interpret=True, **kwargs))(*args)
    calls = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"]  # cache_attention calls them at top level
    return sum(v.aval.size * v.aval.dtype.itemsize for eqn in calls for v in eqn.outvars)


def make_inputs(key, *, batch, kv_heads, group, capacity, chunk, head_dim, dtype):
    ks = jax.random.split(key, 6)
    rows = chunk * group
    args = (
        jax.random.normal(ks[0], (batch, kv_heads, rows, head_dim), dtype),
        jax.random.normal(ks[1], (batch, kv_heads, capacity, head_dim), dtype),
        jax.random.normal(ks[2], (batch, kv_heads, capacity, head_dim), dtype),
        jax.random.bernoulli(ks[3], 0.5, (batch, kv_heads, capacity)),
        jax.random.normal(ks[4], (batch, kv_heads, chunk, head_dim), dtype),
        jax.random.normal(ks[5], (batch, kv_heads, chunk, head_dim), dtype),
        jnp.ones((batch, chunk), bool),
    )
    read = sum(a.nbytes for a in args)
    flops = 4 * batch * kv_heads * rows * (capacity + chunk) * head_dim  # QK^T and PV
    return args, read, flops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results/bench_kernels.json")
    args = parser.parse_args(argv)

    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    dtype = jnp.bfloat16 if on_accelerator else jnp.float32
    impls = {"xla": cache_attention_xla}
    if on_accelerator:
        impls["pallas"] = functools.partial(cache_attention, interpret=False)
    bandwidth = copy_bandwidth(args.repeats)
    rows = []
    jobs = [(kind, cap, impl) for kind in ("decode", "prefill") for cap in args.capacities for impl in impls]
    for kind, cap, impl in tqdm(jobs, desc="kernels", unit="config"):
        chunk = 1 if kind == "decode" else args.prefill_chunk
        inputs, read, flops = make_inputs(jax.random.key(cap), batch=args.batch, kv_heads=args.kv_heads, group=args.group,
                                   capacity=cap, chunk=chunk, head_dim=args.head_dim, dtype=dtype)
        weights = jnp.ones((args.batch, chunk), jnp.float32)
        for stats in (False, True):
            fn = jax.jit(functools.partial(impls[impl], group=args.group, scale=args.head_dim**-0.5,
                                           stat_weights=weights if stats else None))
            seconds = timer(fn, *inputs, repeats=args.repeats)
            writes = kernel_bytes_written(*inputs, group=args.group, scale=1.0, stat_weights=weights if stats else None)
            rows.append(dict(kind=kind, capacity=cap, impl=impl, stats=stats, ms=1e3 * seconds, kernel_bytes_written=writes,
                             bytes_read=read, bytes_per_s=read / seconds, flop_per_s=flops / seconds, of_copy_bandwidth=read / seconds / bandwidth))

    print(f"device {jax.devices()[0]}  copy bandwidth {bandwidth / 1e9:.1f} GB/s  dtype {jnp.dtype(dtype).name}")
    print(f"{'kind':<8} {'slots':>6} {'impl':<7} {'stats':<6} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'GFLOP/s':>8} {'kernel writes':>14}")
    for r in rows:
        print(f"{r['kind']:<8} {r['capacity']:>6} {r['impl']:<7} {str(r['stats']):<6} {r['ms']:>9.3f} "
              f"{r['bytes_per_s'] / 1e9:>8.2f} {r['of_copy_bandwidth']:>8.2f} {r['flop_per_s'] / 1e9:>8.1f} {r['kernel_bytes_written']:>14,}")
    meta = dict(device=str(jax.devices()[0]), machine=platform.machine(), jax=jax.__version__, dtype=jnp.dtype(dtype).name,
                copy_bytes_per_s=bandwidth, **{k: v for k, v in vars(args).items() if k != "out"})
    write_json(args.out, dict(meta=meta, rows=rows))
    return rows


if __name__ == "__main__":
    main()
