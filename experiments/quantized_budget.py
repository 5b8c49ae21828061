"""Bytes buy tokens two ways: fewer slots (eviction) or fewer bits per slot (a storage format).

At each byte budget (a fraction of the float32 full cache of a `length`-token
text), every (policy, slot format) pair gets the most slots that fit
(`kvjax.plan_capacity(..., kv_dtype=...)`, scales counted), and the text
streams through that cache; the perplexity of its second half is reported, as
in `experiments.long_perplexity`. The full cache in each format is a point at
its own bytes. So one plot answers the question a byte budget asks: quantized
eviction, eviction in full precision, or a quantized full cache (KIVI, arXiv
2402.02750, quantizes; H2O, arXiv 2306.14048, evicts). A pair whose budget
holds the whole text runs with capacity = length and is reported at its real bytes.
Cells are appended to a JSON-lines file, so an interrupted run resumes.

    python -m experiments.quantized_budget --model smollm2-135m --length 2048 --policies h2o snapkv \\
        --kv-dtypes float32 bfloat16 int8 fp8 --budgets 0.03125 0.0625 0.125 0.25 0.5   (the defaults)
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
from tqdm import tqdm

import kvjax
from experiments.leaderboard import OPTIONS
from experiments.long_perplexity import TEXTS, text_ids
from experiments.notebook import model_and_tokenizer
from experiments.results import append_jsonl, read_jsonl
from kvjax.evaluate import perplexity
from kvjax.quant import FORMATS


def cell_key(row: dict) -> tuple:
    return row["text"], row["length"], row["policy"], row["kv_dtype"], row["budget"]


def cache_bytes(model, policy) -> int:
    return jax.eval_shape(lambda: model.cache_spec().init(policy, 1)).nbytes


def cell_policy(model, name: str, kv_dtype: str, budget: float, length: int):
    """The policy of a cell: the full cache in `kv_dtype`, or `name` with the slots `budget` (a
    fraction of the float32 full cache's bytes) buys in that format, at most `length`."""
    full = kvjax.policies.make("full", capacity=length, kv_dtype=kv_dtype)
    if name == "full":
        return full
    budget_bytes = int(budget * cache_bytes(model, kvjax.policies.make("full", capacity=length)))
    options = OPTIONS.get(name, {})
    capacity = kvjax.plan_capacity(model, budget_bytes, policy=name, kv_dtype=kv_dtype, **options).policy().capacity
    return full if capacity >= length else kvjax.policies.make(name, capacity=capacity, kv_dtype=kv_dtype, **options)


def markdown(rows: list[dict]) -> str:
    """(policy, format) rows, one column per budget: perplexity (slots)."""
    budgets = sorted({r["budget"] for r in rows if r["policy"] != "full"})
    lines = ["| policy | slots as | " + " | ".join(f"budget {b:g}" for b in budgets) + " | full cache |",
             "|---|---" + "|---:" * (len(budgets) + 1) + "|"]
    full = {r["kv_dtype"]: r for r in rows if r["policy"] == "full"}
    for policy, kv in sorted({(r["policy"], r["kv_dtype"]) for r in rows if r["policy"] != "full"}):
        cells = {r["budget"]: r for r in rows if (r["policy"], r["kv_dtype"]) == (policy, kv)}
        values = ["-" if b not in cells else f"{cells[b]['perplexity']:.2f} ({cells[b]['capacity']})" for b in budgets]
        ceiling = full.get(kv)
        ceiling = "-" if ceiling is None else f"{ceiling['perplexity']:.2f} at {ceiling['bytes_fraction']:.2f}"
        lines.append(f"| {policy} | {kv} | " + " | ".join(values) + f" | {ceiling} |")
    return "\n".join(lines)


def figure(rows: list[dict]):
    """Perplexity vs cache bytes (fraction of the float32 full cache), one curve per (policy, format)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    formats = sorted({r["kv_dtype"] for r in rows})
    colours = dict(zip(formats, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(sorted({r["policy"] for r in rows} - {"full"}), "osD^v"))
    for policy, kv in sorted({(r["policy"], r["kv_dtype"]) for r in rows if r["policy"] != "full"}):
        points = sorted((r["bytes_fraction"], r["perplexity"]) for r in rows if (r["policy"], r["kv_dtype"]) == (policy, kv))
        ax.plot(*zip(*points), marker=markers[policy], color=colours[kv], label=f"{policy} {kv}")
    for r in rows:
        if r["policy"] == "full":
            ax.scatter(r["bytes_fraction"], r["perplexity"], marker="*", s=150, color=colours[r["kv_dtype"]], zorder=3,
                       label=f"full {r['kv_dtype']}")
    ax.set(xscale="log", xlabel="cache bytes / float32 full cache", ylabel="perplexity (2nd half)",
           title=f"{rows[0]['text']}, {rows[0]['length']:,} tokens, {rows[0]['model']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models.load source, or 'tiny' (random weights, bytes)")
    parser.add_argument("--text", default="essays", choices=list(TEXTS))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--policies", nargs="+", default=["h2o", "snapkv"], choices=kvjax.policies.names())
    parser.add_argument("--kv-dtypes", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.03125, 0.0625, 0.125, 0.25, 0.5],
                        help="fractions of the float32 full cache")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per compiled call (a chunk's tokens see each other)")
    parser.add_argument("--out", default="results/quantized_budget.jsonl")
    args = parser.parse_args(argv)

    model, tokenizer = model_and_tokenizer(args.model)
    ids = text_ids(tokenizer, args.text, args.length)
    out = pathlib.Path(args.out)
    cells = [(args.text, args.length, "full", kv, 1.0) for kv in args.kv_dtypes]
    cells += [(args.text, args.length, p, kv, b) for p in args.policies for kv in args.kv_dtypes for b in args.budgets]
    done = {cell_key(r) for r in read_jsonl(out)}
    todo = [c for c in cells if c not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {out}")
    reference = cache_bytes(model, kvjax.policies.make("full", capacity=args.length))
    start = time.perf_counter()
    for text, length, name, kv, budget in tqdm(todo, desc="cells", unit="cell"):
        t0 = time.perf_counter()
        policy = cell_policy(model, name, kv, budget, length)
        ppl = perplexity(model, ids, policy=policy, chunk_size=args.chunk, start=length // 2)
        nbytes = cache_bytes(model, policy)
        append_jsonl(out, dict(text=text, length=length, policy=name, kv_dtype=kv, budget=budget, capacity=policy.capacity,
                               cache_bytes=nbytes, bytes_fraction=nbytes / reference, perplexity=ppl,
                               seconds=time.perf_counter() - t0, model=args.model))
    rows = [r for r in read_jsonl(out) if cell_key(r) in set(cells)]
    table = markdown(rows)
    print(table, f"\n\nwall time this run: {time.perf_counter() - start:.0f} s; cells: {len(rows)}")
    out.with_suffix(".md").write_text(table + "\n")
    figure(rows).savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
