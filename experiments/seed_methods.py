"""Seed methods against the baselines on SmolLM2-135M at 25% and 50% of a real-text context.

For each policy and budget: the streaming perplexity of the context's second
half (every token predicted from the compressed cache of everything before it),
passkey accuracy at the same length, and the cache bytes. Writes JSON and a
plot of quality against cache bytes, one line per policy. POD's layer blocks
are calibrated first on a different essay (`kvjax.calibrate.pod_blocks`), once
per similarity threshold delta.

    python -m experiments.seed_methods [--context 2048] [--budgets 0.25 0.5] [--trials 4]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
from tqdm import tqdm

import kvjax
from experiments import passkey
from experiments.results import write_json
from experiments.texts import essay
from models import load

POLICIES = ["full", "streaming_llm", "h2o", "tova", "snapkv", "kvmerger", "pod", "bct"]


def make(name: str, capacity: int, owners) -> kvjax.Policy:
    if name == "pod":
        return kvjax.policies.make(name, capacity=capacity, owners=owners)
    return kvjax.policies.make(name, capacity=capacity)


def markdown(rows: list[dict]) -> str:
    """The README table: one row per policy and budget."""
    lines = ["| policy | budget | slots/layer | cache MiB | perplexity (2nd half) | passkey 0.1 / 0.5 / 0.9 |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        depths = " / ".join(f"{d['accuracy']:.0%}" for d in r["passkey_by_depth"])
        lines.append(f"| {r['policy']} | {r['budget']:.0%} | {r['capacity']} | {r['cache_mib']:.2f} | {r['perplexity']:.2f} | {depths} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("no plot: pip install matplotlib (or the kvjax[plots] extra)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    full = next(r for r in rows if r["policy"] == "full")
    top = 1.5 * full["perplexity"]  # a policy that collapses is drawn at the top edge, with its value
    for name in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["cache_mib"], r["perplexity"], r["passkey"]) for r in rows if r["policy"] == name)
        style = dict(marker="*", markersize=12) if name == "full" else dict(marker="o")
        line = axes[0].plot([p[0] for p in pts], [min(p[1], top) for p in pts], label=name, **style)[0]
        for x, ppl, _ in pts:
            if ppl > top:
                axes[0].annotate(f"{ppl:.0f}", (x, top), textcoords="offset points", xytext=(4, -12), color=line.get_color(), fontsize=8)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], label=name, **style)
    axes[0].axhline(full["perplexity"], color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="cache MiB", ylabel="perplexity of the second half (lower is better)", ylim=(0.97 * full["perplexity"], 1.03 * top))
    axes[1].set(xlabel="cache MiB", ylabel="passkey accuracy", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, real text; budgets as a fraction of the context")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--policies", nargs="+", default=POLICIES, choices=kvjax.policies.names())
    parser.add_argument("--trials", type=int, default=4, help="passkey trials per depth")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--pod-deltas", type=float, nargs="+", default=[0.5, 0.8], help="POD's block similarity thresholds")
    parser.add_argument("--reuse", help="a previous JSON whose rows stand in for the policies not run now")
    parser.add_argument("--out", default="results/seed_methods.json")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    text = np.asarray(tokenizer.encode(essay("worked")))[None, : args.context]
    if text.shape[1] < args.context:
        raise ValueError(f"the essay has {text.shape[1]} tokens, fewer than --context {args.context}")
    owners = {}
    if "pod" in args.policies:
        calib = np.asarray(tokenizer.encode(essay("founders")))[None, :1024]
        for delta in args.pod_deltas:
            owners[delta] = kvjax.calibrate.pod_blocks(model, calib, delta=delta, sinks=16, window=64, queries=64, chunk_size=128)
            shared = sum(o != layer for layer, row in enumerate(owners[delta]) for o in row)
            print(f"POD blocks (delta {delta}): {shared} of {len(owners[delta]) * len(owners[delta][0])} (layer, head) pairs read another layer's distant keys")
    runs = [(p, None) for p in args.policies if p != "pod"] + [("pod", d) for d in owners]
    jobs = [("full", None, 1.0)] + [(p, d, b) for p, d in runs if p != "full" for b in args.budgets]
    rows = []
    for name, delta, budget in tqdm(jobs, desc="policies x budgets", unit="run"):
        capacity = int(budget * args.context)
        policy = make(name, capacity + (8 if name == "full" else 0), owners.get(delta))
        label = name if delta is None else f"pod δ={delta}"
        start = time.perf_counter()
        ppl = kvjax.evaluate.perplexity(model, text, policy=policy, chunk_size=256, start=args.context // 2)
        keys = passkey.run(model, tokenizer, lambda length, policy=policy: policy, lengths=[args.context], depths=args.depths, trials=args.trials)
        rows.append(dict(policy=label, budget=budget, capacity=capacity, cache_mib=model.cache_spec().init(policy, 1).nbytes / 2**20,
                         perplexity=ppl, passkey=float(np.mean([r["accuracy"] for r in keys])), passkey_by_depth=keys,
                         seconds=time.perf_counter() - start))
        tqdm.write(f"{label:<14} {budget:>5.0%} ppl {ppl:8.3f}  passkey {rows[-1]['passkey']:.0%}")
    if args.reuse:
        rows += [r for r in json.loads(pathlib.Path(args.reuse).read_text())["rows"] if r["policy"].split()[0] not in args.policies]
    out = write_json(args.out, dict(model=args.model, context=args.context, trials=args.trials, depths=args.depths,
                                    pod_owners={str(d): o for d, o in owners.items()}, rows=rows))
    print(markdown(rows))
    plot(rows, out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
