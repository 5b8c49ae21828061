"""A long, hostile run: a 1,000,000-token stream through the tiny model with H2O at 256 slots.

For each length (10k, 100k, 1M tokens) a fresh process streams random token ids
through `kvjax.evaluate.stream_nll` and reports its peak resident memory, the
time, and whether any NLL is NaN; memory must not grow with the length beyond
the ids and the per-token NLL themselves (8 bytes a token). It also measures
RoPE's precision at large positions: f32 angles lose absolute precision as
positions grow, which shows up as an error in the query-key logit of nearby
tokens (the quantity attention uses) against a float64 computation.

    python -m experiments.long_stream [--lengths 10000 100000 1000000] [--capacity 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from experiments.results import write_json


def one_run(length: int, capacity: int, chunk: int) -> dict:
    """Stream `length` random ids in this process; its peak RSS and the NLL's health."""
    import jax
    from flax import nnx

    import kvjax
    from models import Llama, LlamaConfig

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, 256, size=(1, length), dtype=np.int32)
    start = time.perf_counter()
    nll = np.asarray(jax.block_until_ready(kvjax.evaluate.stream_nll(model, ids, policy=kvjax.policies.make("h2o", capacity=capacity), chunk_size=chunk)))
    return dict(tokens=length, seconds=time.perf_counter() - start, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                nan=int(np.isnan(nll).sum()), mean_nll=float(nll.mean()), max_position=length - 1)


def rope_precision(positions=(2**10, 2**16, 2**20, 2**21, 2**24), head_dim=64, theta=10_000.0, offset=5) -> list[dict]:
    """|logit error| of q.k for a query at p and a key at p - offset, f32 RoPE against float64."""
    import jax.numpy as jnp

    import kvjax

    rope = kvjax.Rope(theta=theta)
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, head_dim))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)

    def rot64(x, p):
        a, b = x[: head_dim // 2], x[head_dim // 2 :]
        ang = p * inv
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)])

    rows = []
    for p in positions:
        exact = rot64(q, p) @ rot64(k, p - offset)
        got = float(rope(jnp.asarray(q, jnp.float32), jnp.int32(p)) @ rope(jnp.asarray(k, jnp.float32), jnp.int32(p - offset)))
        rows.append(dict(position=p, logit_f64=float(exact), logit_f32=got, abs_error=abs(got - float(exact))))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="results/long_stream.json")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args.one, args.capacity, args.chunk_size)))
        return None
    runs = []
    for n in args.lengths:
        cmd = [sys.executable, "-m", "experiments.long_stream", "--one", str(n), "--capacity", str(args.capacity), "--chunk-size", str(args.chunk_size)]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{r['tokens']:>9} tokens  {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB  NaN {r['nan']}  mean NLL {r['mean_nll']:.3f}", flush=True)
    precision = rope_precision()
    for r in precision:
        print(f"RoPE at position {r['position']:>9}: q.k f32 {r['logit_f32']:+.5f} vs f64 {r['logit_f64']:+.5f} (error {r['abs_error']:.1e})")
    write_json(args.out, dict(capacity=args.capacity, chunk_size=args.chunk_size, runs=runs, rope_precision=precision))
    return runs, precision


if __name__ == "__main__":
    main()
