"""Long-context leaderboard: RULER-style tasks x policies x budgets x protocols, resumable, with a table and a plot.

Each cell (task, policy, budget, protocol) answers `--samples` generated
samples greedily (`kvjax.evaluate.answer`) and scores them as RULER does
(`experiments.ruler.score`). A budget is a fraction of the context (capacity =
budget x context tokens) or bytes ("64MiB": `kvjax.plan_capacity` gives every
policy the same cache bytes). `full` runs once per task and protocol: the
ceiling. Cells are appended to a JSON-lines file as they finish, so an
interrupted run resumes where it stopped and no finished cell is recomputed.

Protocols (named in every row): "kvpress" compresses the context once, then
appends the question (query-agnostic; kvpress's leaderboard); "streaming"
streams the whole prompt, question included, through the fixed-capacity cache.

A task the model cannot do even with the full cache (ceiling below
`--min-ceiling`) is dropped from the averages and named, rather than reported as noise.

`--kv-dtypes int8 fp8` runs every policy (full included) again with its slots
stored in those formats (`kvjax.quant`), labelled "h2o@int8": with byte budgets,
each (policy, format) gets the slots its bytes buy.

    python -m experiments.leaderboard --model smollm2-135m --context 4096 --budgets 0.125 0.25 0.5 \\
        --policies streaming_llm h2o snapkv --tasks niah_single variable_tracking --samples 10
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

import kvjax
from experiments import ruler
from experiments.notebook import model_and_tokenizer
from experiments.results import append_jsonl, read_jsonl
from kvjax.evaluate import PROTOCOLS, answer
from kvjax.plan import BudgetTooSmall, parse_bytes
from kvjax.quant import FORMATS, slot_format

BASELINES = ["streaming_llm", "h2o", "tova", "snapkv", "pyramidkv", "knorm"]
OPTIONS = {"snapkv": dict(window=16), "pyramidkv": dict(window=8, beta=4.0)}  # observation windows that fit 1/8 budgets


def label(name: str, kv_dtype: str | None) -> str:
    """A cell's policy column: the registry name, with "@format" when its slots are stored narrow."""
    return name if kv_dtype is None else f"{name}@{kv_dtype}"


def parse_label(policy: str) -> tuple[str, str | None]:
    name, _, kv_dtype = policy.partition("@")
    return name, kv_dtype or None


def policy_for(model, policy: str, budget: str, context: int, extra: int):
    """The policy of a cell (a `label`); `extra` slots more for `full` (question + answer under
    streaming). A byte budget is per sample: planned for one row, and every row of a batch gets as much."""
    name, kv_dtype = parse_label(policy)
    group = 1 if kv_dtype is None else slot_format(kv_dtype).slot_multiple  # KIVI's formats: whole groups of slots
    if name == "full":
        return kvjax.policies.make("full", capacity=-(-(context + extra) // group) * group, kv_dtype=kv_dtype)
    options = dict(OPTIONS.get(name, {}), kv_dtype=kv_dtype)
    if budget.replace(".", "", 1).isdigit():
        capacity = max(int(float(budget) * context), 8)
        return kvjax.policies.make(name, capacity=max(capacity - capacity % group, group), **options)
    return kvjax.plan_capacity(model, parse_bytes(budget), policy=name, **options).policy().inner


def budget_value(budget: str) -> float:
    """A budget's size for ordering: the fraction, or the bytes."""
    try:
        return float(budget)
    except ValueError:
        return float(parse_bytes(budget))


def cell_key(row: dict) -> tuple:
    return row["task"], row["policy"], row["budget"], row["protocol"]


def run_cell(model, tokenizer, task_samples, name, budget, protocol, *, context, new_tokens, batch) -> dict:
    start = time.perf_counter()
    longest_q = max(len(s.question) for s in task_samples)
    policy = policy_for(model, name, budget, context, longest_q + new_tokens)
    scores, outputs = [], []
    for i in range(0, len(task_samples), batch):
        group = task_samples[i : i + batch]
        out = answer(model, [s.context for s in group], [s.question for s in group], policy=policy, protocol=protocol,
                     max_new_tokens=new_tokens, stop_tokens=() if tokenizer.eos_id is None else tokenizer.eos_id)
        for s, toks, n in zip(group, np.asarray(out.tokens), np.asarray(out.lengths)):
            text = tokenizer.decode(toks[:n])
            outputs.append(text)
            scores.append(ruler.score(text, s.answers))
    return dict(task=task_samples[0].task, policy=name, budget=budget, protocol=protocol, capacity=policy.capacity,
                score=float(np.mean(scores)), samples=len(scores), seconds=time.perf_counter() - start, outputs=outputs[:3])


def summarise(rows: list[dict], min_ceiling: float) -> tuple[str, list[str]]:
    """A markdown table per protocol (policy x budget rows, task columns, mean over kept tasks), and the dropped tasks."""
    tasks = sorted({r["task"] for r in rows})
    ceiling = {(r["task"], r["protocol"]): r["score"] for r in rows if r["policy"] == "full"}
    dropped = sorted({t for (t, _), s in ceiling.items() if s < min_ceiling})
    kept = [t for t in tasks if t not in dropped]
    lines = []
    for protocol in sorted({r["protocol"] for r in rows}):
        cells = {(r["policy"], r["budget"], r["task"]): r["score"] for r in rows if r["protocol"] == protocol}
        lines += [f"\n**{protocol} protocol** (score = fraction of expected answers found, RULER's string_match_all)\n",
                  "| policy | budget | " + " | ".join(tasks) + " | mean (kept tasks) |", "|---" * (len(tasks) + 3) + "|"]
        for policy, budget in sorted({(p, b) for p, b, _ in cells}, key=lambda pb: (parse_label(pb[0])[0] != "full", pb[0], budget_value(pb[1]))):
            scores = [cells.get((policy, budget, t)) for t in tasks]
            mean = np.mean([cells[(policy, budget, t)] for t in kept if (policy, budget, t) in cells] or [np.nan])
            lines.append(f"| {policy} | {budget} | " + " | ".join("-" if s is None else f"{s:.2f}" for s in scores) + f" | {mean:.2f} |")
    return "\n".join(lines), dropped


def figure(rows: list[dict], dropped: list[str]):
    """Mean score over the kept tasks vs budget, one line per policy, the full-cache ceiling dashed; one panel per protocol."""
    import matplotlib.pyplot as plt

    protocols = sorted({r["protocol"] for r in rows})
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.5 * len(protocols), 4), squeeze=False, sharey=True)
    kept = lambda r: r["task"] not in dropped  # noqa: E731
    for ax, protocol in zip(axes[0], protocols):
        mine = [r for r in rows if r["protocol"] == protocol and kept(r)]
        ceilings = sorted({r["policy"] for r in mine if parse_label(r["policy"])[0] == "full"})
        for i, full in enumerate(ceilings):
            ax.axhline(np.mean([r["score"] for r in mine if r["policy"] == full]), color=f"{0.5 * i / max(1, len(ceilings) - 1)}",
                       linestyle="--", label=full.replace("full", "full cache", 1))
        for policy in sorted({r["policy"] for r in mine} - set(ceilings)):
            budgets = sorted({r["budget"] for r in mine if r["policy"] == policy}, key=budget_value)
            means = [np.mean([r["score"] for r in mine if r["policy"] == policy and r["budget"] == b]) for b in budgets]
            ax.plot(budgets, means, marker="o", label=policy)
        ax.set(title=f"{protocol} protocol", xlabel="budget", ylim=(-0.02, 1.02))
    axes[0][0].set_ylabel("mean score (kept tasks)")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], dropped: list[str], path: pathlib.Path) -> pathlib.Path:
    """`figure` saved to `path` (and closed)."""
    import matplotlib.pyplot as plt

    fig = figure(rows, dropped)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models.load source, or 'tiny' (random weights, bytes)")
    parser.add_argument("--context", type=int, default=4096, help="tokens per sample, question included")
    parser.add_argument("--policies", nargs="+", default=BASELINES, choices=kvjax.policies.names())
    parser.add_argument("--budgets", nargs="+", default=["0.125", "0.25", "0.5"], help="fractions of the context, or bytes ('64MiB')")
    parser.add_argument("--kv-dtypes", nargs="+", default=[None], choices=[None, *FORMATS], type=lambda s: None if s == "none" else s,
                        help="slot formats to run every policy in ('none': the model's dtype; e.g. none int8)")
    parser.add_argument("--tasks", nargs="+", default=list(ruler.TASKS), choices=list(ruler.TASKS))
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2, help="samples per generate call")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-ceiling", type=float, default=0.2, help="drop tasks whose full-cache score is lower")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/leaderboard.jsonl")
    args = parser.parse_args(argv)

    model, tokenizer = model_and_tokenizer(args.model)
    out = pathlib.Path(args.out)
    done = {cell_key(r) for r in read_jsonl(out)}
    per_format = [(label(p, kv), b) for kv in args.kv_dtypes
                  for p, b in [("full", "1.0")] + [(p, b) for p in args.policies if p != "full" for b in args.budgets]]
    cells = [(t, p, b, pr) for t in args.tasks for pr in args.protocols for p, b in per_format]
    todo = [c for c in cells if c not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {out}")
    cache: dict[str, list] = {}
    unfit = {}  # (policy, budget) -> why a cell's budget cannot hold the policy (its format's fixed parts, say)
    start = time.perf_counter()
    for task, policy, budget, protocol in tqdm(todo, desc="cells", unit="cell"):
        if task not in cache:
            cache[task] = ruler.samples(task, tokenizer, args.context, args.samples, seed=args.seed)
        try:
            row = run_cell(model, tokenizer, cache[task], policy, budget, protocol, context=args.context,
                           new_tokens=args.new_tokens, batch=args.batch)
        except BudgetTooSmall as err:
            unfit[(policy, budget)] = str(err)
            tqdm.write(f"{policy} at {budget} does not fit: {err}")
            continue
        row.update(model=args.model, context=args.context, seed=args.seed)
        append_jsonl(out, row)
        jax.clear_caches()  # each cell compiles its own programs; keeping all, one run of 16 SmolLM2 cells ran out of LLVM's memory maps
    rows = [r for r in read_jsonl(out) if cell_key(r) in set(cells)]
    table, dropped = summarise(rows, args.min_ceiling)
    print(table)
    if dropped:
        print(f"\ndropped (full-cache score < {args.min_ceiling}: the model cannot do them at {args.context} tokens): {', '.join(dropped)}")
    print(f"\nwall time this run: {time.perf_counter() - start:.0f} s; cells: {len(rows)}")
    does_not_fit = "".join(f"\n\n{p} at {b} does not fit: {why}" for (p, b), why in unfit.items())
    out.with_suffix(".md").write_text(table + ("\n\ndropped: " + ", ".join(dropped) if dropped else "") + does_not_fit + "\n")
    print(f"wrote {out.with_suffix('.md')} and {plot(rows, dropped, out.with_suffix('.png'))}")
    return rows


if __name__ == "__main__":
    main()
