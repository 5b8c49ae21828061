"""Peak process memory while the context grows, with a predefined-capacity cache.

Each context length runs in a fresh process (peak RSS only grows within one):
the tiny model streams `length` random tokens through a cache planned by
`kvjax.plan_capacity` (default: BCT, 256 slots per layer) and reports its peak
resident memory, the cache bytes and the compiled program's scratch bytes. With
a predefined capacity all three stay flat from 1k to 64k tokens, apart from the
token ids themselves; `full` is run beside it for contrast.

    python -m experiments.bench_memory [--lengths 1024 4096 16384 65536] [--policies bct full]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from tqdm import tqdm

from experiments.results import write_json


def measure(policy: str, length: int, slots: int, chunk: int) -> dict:
    """Run in this process: stream `length` tokens, return peak RSS and byte counts."""
    import resource

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import kvjax
    from models import Llama, LlamaConfig

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    plan = kvjax.plan_capacity(model, tokens=length if policy == "full" else slots, policy=policy)
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (1, length), 1, 256)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        p = plan.policy()
        return kvjax.prefill(m, tokens, jnp.ones_like(tokens, bool), m.cache_spec().init(p, 1), jax.random.key(0), chunk_size=chunk)

    compiled = run.lower(state, tokens).compile()
    _, cache = compiled(state, tokens)
    jax.block_until_ready(cache)
    return dict(policy=policy, length=length, slots=plan.slots[0], cache_bytes=cache.nbytes,
                scratch_bytes=compiled.memory_analysis().temp_size_in_bytes,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--policies", nargs="+", default=["bct", "full"])
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--out", default="results/bench_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("POLICY", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.slots, args.chunk)))
        return None
    rows = []
    for policy, length in tqdm([(p, n) for p in args.policies for n in args.lengths], desc="processes", unit="run"):
        cmd = [sys.executable, "-m", "experiments.bench_memory", "--child", policy, str(length), "--slots", str(args.slots), "--chunk", str(args.chunk)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
    print(f"{'policy':<8} {'tokens':>7} {'slots':>7} {'cache MiB':>10} {'scratch MiB':>12} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['policy']:<8} {r['length']:>7} {r['slots']:>7} {r['cache_bytes'] / 2**20:>10.3f} "
              f"{r['scratch_bytes'] / 2**20:>12.3f} {r['peak_rss_mib']:>13.1f}")
    write_json(args.out, dict(rows=rows))
    return rows


if __name__ == "__main__":
    main()
