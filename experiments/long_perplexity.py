"""Long-text perplexity: each policy at fractions of a 4k- or 8k-token text, against the full cache.

For each text and length, the text's first `length` tokens stream through the
policy's fixed-capacity cache chunk by chunk (`kvjax.evaluate.perplexity`), and
the perplexity of the second half is reported: every token there is predicted
from the compressed cache of everything before it, so the cache is full and
compressing for all of it. A chunk's tokens see each other before the chunk is
compressed in, so a token sees the capacity plus its offset in its chunk: the
chunk (64 by default) is kept small next to the budgets. Texts: Paul Graham's essays concatenated ("essays")
and Austen's novels ("austen"; the `train` extra). Budgets are fractions of the
length or bytes, as in `experiments.leaderboard` (same policies and options).
Cells are appended to a JSON-lines file, so an interrupted run resumes; a
markdown table and a plot (perplexity vs budget, full cache dashed) are written.

    python -m experiments.long_perplexity --model smollm2-135m --lengths 4096 8192 --texts essays austen \\
        --budgets 0.125 0.25 0.5 --policies streaming_llm h2o tova snapkv knorm
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
from tqdm import tqdm

import kvjax
from experiments import corpora
from experiments.leaderboard import BASELINES, policy_for
from experiments.notebook import model_and_tokenizer
from experiments.results import append_jsonl, read_jsonl
from experiments.texts import all_essays
from kvjax.evaluate import perplexity

TEXTS = {"essays": all_essays, "austen": lambda: "\n\n".join(corpora.austen())}


def text_ids(tokenizer, text: str, length: int) -> np.ndarray:
    """The first `length` tokens of a text as [1, length] ids; a shorter text is an error, not a shorter run."""
    ids = np.asarray(tokenizer.encode(TEXTS[text]()[: 16 * length]), np.int32)[:length]  # 16 characters a token is ample
    if len(ids) < length:
        raise ValueError(f"the {text} text has {len(ids)} tokens, fewer than length={length}")
    return ids[None]


def cell_key(row: dict) -> tuple:
    return row["text"], row["length"], row["policy"], row["budget"]


def markdown(rows: list[dict]) -> str:
    """Policy x budget rows, one column per text and length; the full cache first."""
    columns = sorted({(r["text"], r["length"]) for r in rows})
    cells = {(r["policy"], r["budget"], r["text"], r["length"]): r for r in rows}
    lines = ["| policy | budget | " + " | ".join(f"{t} {n:,}" for t, n in columns) + " |", "|---|---" + "|---:" * len(columns) + "|"]
    for policy, budget in sorted({(r["policy"], r["budget"]) for r in rows}, key=lambda pb: (pb[0] != "full", pb[0], pb[1])):
        values = [cells.get((policy, budget, t, n)) for t, n in columns]
        lines.append(f"| {policy} | {budget} | " + " | ".join("-" if v is None else f"{v['perplexity']:.2f}" for v in values) + " |")
    return "\n".join(lines)


def figure(rows: list[dict]):
    """Perplexity vs budget per policy, one panel per text and length, the full cache dashed."""
    import matplotlib.pyplot as plt

    columns = sorted({(r["text"], r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), squeeze=False)
    for ax, (text, length) in zip(axes[0], columns):
        mine = [r for r in rows if r["text"] == text and r["length"] == length]
        for r in mine:
            if r["policy"] == "full":
                ax.axhline(r["perplexity"], color="black", linestyle="--", label="full cache")
        for policy in sorted({r["policy"] for r in mine} - {"full"}):
            points = sorted((float(r["budget"]), r["perplexity"]) for r in mine if r["policy"] == policy)
            ax.plot(*zip(*points), marker="o", label=policy)
        ax.set(title=f"{text}, {length:,} tokens", xlabel="budget (fraction of the text)", ylabel="perplexity (2nd half)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models.load source, or 'tiny' (random weights, bytes)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--policies", nargs="+", default=BASELINES, choices=kvjax.policies.names())
    parser.add_argument("--budgets", nargs="+", default=["0.125", "0.25", "0.5"], help="fractions of the length")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per compiled call (a chunk's tokens see each other)")
    parser.add_argument("--out", default="results/long_perplexity.jsonl")
    args = parser.parse_args(argv)

    model, tokenizer = model_and_tokenizer(args.model)
    out = pathlib.Path(args.out)
    cells = [(t, n, p, b) for t in args.texts for n in args.lengths
             for p, b in [("full", "1.0")] + [(p, b) for p in args.policies if p != "full" for b in args.budgets]]
    done = {cell_key(r) for r in read_jsonl(out)}
    todo = [c for c in cells if c not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {out}")
    start = time.perf_counter()
    for text, length, name, budget in tqdm(todo, desc="cells", unit="cell"):
        t0 = time.perf_counter()
        policy = policy_for(model, name, budget, length, extra=0)
        ppl = perplexity(model, text_ids(tokenizer, text, length), policy=policy, chunk_size=args.chunk, start=length // 2)
        append_jsonl(out, dict(text=text, length=length, policy=name, budget=budget, capacity=policy.capacity, perplexity=ppl,
                               seconds=time.perf_counter() - t0, model=args.model))
    rows = [r for r in read_jsonl(out) if cell_key(r) in set(cells)]
    table = markdown(rows)
    print(table, f"\n\nwall time this run: {time.perf_counter() - start:.0f} s; cells: {len(rows)}")
    out.with_suffix(".md").write_text(table + "\n")
    fig = figure(rows)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
