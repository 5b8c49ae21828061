"""A testbed where cache memory matters: a byte-level model that must recall key-value pairs from anywhere in 1,024 bytes.

1. Pretrain the byte-level Llama of `experiments.dmc_replication` from scratch on
   a mix (`experiments.recall.RecallMix`): a quarter of the rows Austen +
   Shakespeare, three quarters the same text with key-value pairs and repeats
   of them spliced in, in a curriculum of 32-, 128- and 1,024-byte rows
   (`pretrained`; shorter rows first, or the look-up is not learned).
2. From it, each for the same steps on the same mix: a continued-training
   control, DMC retrofits at 2x and 4x (the three stages of arXiv 2403.09636,
   Sec. 4) and POD's post-training (arXiv 2412.02252, Sec. 3.3) at one delta.
3. At equal cache bytes per row, on held-out text:
   - recall accuracy, greedy exact match, under the streaming protocol (the
     question streams through the fixed-capacity cache too, in the last
     128-byte prefill chunk with the context's tail: a policy that scores by
     that chunk's queries, SnapKV, or by the newest query, TOVA, sees the asked
     key at its last compression; H2O's summed mass and StreamingLLM's recency
     do not), on two tasks (`TASKS`): a passkey
     (one pair in 1,022 bytes of text, then its key) and associative recall
     (16 pairs, one asked);
   - perplexity of the second half of 1,024-byte text windows.
   Eviction and merging baselines run on the continued model at 1/2 and 1/4
   of the full cache's bytes (`kvjax.plan_capacity`), and at each trained
   method's own bytes (`--matched`); DMC at the bytes its
   learned merging leaves (mean slots in use) and under a hard capacity at its
   target; POD keeping every token (bytes saved by sharing keys), and POD +
   SnapKV at half the slots.

Every training stage checkpoints into --workdir and resumes if interrupted; each
evaluated cell is appended to a JSON-lines file there and never recomputed.
Writes JSON, a markdown table and a plot into --out.

    python -m experiments.recall_testbed [--scale cpu|accelerator] [--pretrain-steps N] [--steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import kvjax
from experiments import recall
from experiments.dmc_replication import CONFIG, corpus, perplexity, retrofit_model, run_stage, with_scale
from experiments.pod_replication import SINKS, WINDOW, pod
from experiments.results import append_jsonl, read_jsonl, save_figure, write_json
from kvjax import retrofit
from kvjax.evaluate import answer
from models.llama import Llama, LlamaConfig

T = 1024
TASKS = {"passkey": 1, "recall-16": 16}  # pairs per context
FRACTIONS = (0.5, 0.25)
BASELINES = ["h2o", "snapkv", "streaming_llm", "tova", "kvmerger", "bct"]
OPTIONS = {"kvmerger": dict(exclude_layers=())}  # merge in every layer: excluding 0, 1 and -1 would leave one of four
SCALES = {  # "cpu" is what the README reports (this 2-core machine); "accelerator" is for a lent GPU/TPU (not run yet).
    # pretrain_steps is per stage of CURRICULUM.
    "cpu": dict(pretrain_steps=400, steps=120, batch=4, samples=48, windows=16),
    "accelerator": dict(pretrain_steps=5000, steps=3000, batch=32, samples=256, windows=64),
}


CURRICULUM = (  # (row bytes, pairs, repeats, learning rate): the same bytes per step in each stage
    (32, 4, 10, 2e-3),
    (128, 12, 40, 2e-3),
    (T, 28, 300, 1e-3),
)


def stage_rows(text, stage: tuple, batch: int, seed: int, recall_fraction: float = 0.75) -> recall.RecallMix:
    """The mix of one `CURRICULUM` stage: its rows, as many per step as `batch` x 1,024 bytes hold."""
    length, pairs, repeats, _ = stage
    return recall.RecallMix(text, length, batch * T // length, seed=seed, pairs=pairs, repeats=repeats,
                            recall_fraction=recall_fraction)


def pretrained(text, steps: int, batch: int, workdir: pathlib.Path):
    """The model pretrained from scratch on the text/recall mix (resumed or read back from `workdir`), and its log.

    A curriculum (`CURRICULUM`) of `steps` steps per stage, each on rows of `batch` x 1,024 bytes: 32-byte
    rows with 4 pairs, then 128-byte rows with 12, then 1,024-byte rows with 28. The look-up is an
    induction circuit (a head that copies the key into its value's position, then one that matches the
    asked key there; Olsson et al., arXiv 2209.11895), and at initialisation attention spreads over every
    position, so the gradient towards the one that holds the key shrinks with the row. Measured on this
    model: on 32-byte rows the accuracy on keys' values jumped from 0.15 (the set of values) to 0.72 (the
    most the rows allow) between steps 200 and 270, while a curriculum that began at 128-byte rows had
    learned only the set of values after 900 steps, and 1,024-byte rows alone nothing in 200-400."""
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    log = []
    for stage in CURRICULUM:
        length, lr = stage[0], stage[-1]
        log += run_stage(model, retrofit.language_model_loss(), stage_rows(text, stage, batch, seed=0), steps, lr,
                         workdir / f"rows-{length}", f"pretrain, {length}-byte rows", warmup=min(100, steps // 10))
    return model, log


def config_for(policy_name: str) -> LlamaConfig:
    """The model's shapes; DMC's as retrofitted (its decision dimension trained), which `plan_capacity` checks."""
    return dataclasses.replace(CONFIG, dmc_decisions=True) if policy_name == "dmc" else CONFIG


def row_bytes(policy_name: str, slots: int, **options) -> int:
    return kvjax.plan_capacity(config_for(policy_name), tokens=slots, policy=policy_name, **options).nbytes


def lookup_accuracy(model, rows) -> float:
    """Greedy accuracy of `model` (full attention, no cache) on the byte after each key in `rows` ([N, L + 1],
    as `recall.RecallMix` makes them): how much of the look-up pretraining taught. A pair's first sight in a
    row cannot be predicted, so the most a row allows is the share of keys that are repeats."""
    rows = np.asarray(rows)
    logits, _ = model.full_sequence(jnp.asarray(rows[:, :-1]), retrofit.vanilla_attention, jax.random.key(0))
    at_key = np.isin(rows[:, :-1], recall.KEYS)
    return float((np.asarray(logits).argmax(-1) == rows[:, 1:])[at_key].mean())


def at_bytes(name: str, nbytes: int) -> kvjax.Policy:
    """Policy `name` with as many slots as `nbytes` per row hold."""
    return kvjax.plan_capacity(config_for(name), nbytes, policy=name, **OPTIONS.get(name, {})).policy().inner


def recall_accuracy(model, policy, samples: list[recall.Sample], batch: int = 32) -> tuple[float, float]:
    """(exact-match accuracy, mean slots in use per layer and head at the end) under the streaming protocol."""
    hits, slots = [], []
    for i in range(0, len(samples), batch):
        group = samples[i : i + batch]
        out = answer(model, [s.context for s in group], [s.question for s in group], policy=policy, protocol="streaming",
                     max_new_tokens=recall.ANSWER_BYTES)
        for s, toks in zip(group, np.asarray(out.tokens)):
            hits.append(recall.score(bytes(toks.astype(np.uint8)).decode("latin-1"), s.answer))
        slots.append(float(np.asarray(out.cache.lengths()).mean()))
    return float(np.mean(hits)), float(np.mean(slots))


class Cells:
    """Evaluated cells, appended one JSON line each to `path`: a cell already there is read back, not rerun."""

    def __init__(self, path: pathlib.Path, model_windows, samples: dict[str, list[recall.Sample]]):
        self.path, self.windows, self.samples = path, model_windows, samples
        self.rows = read_jsonl(path)

    def add(self, method: str, model_name: str, model, policy, nbytes: int | None, fraction: float | None = None) -> dict:
        key = dict(method=method, model=model_name, fraction=fraction)
        for row in self.rows:
            if all(row[k] == v for k, v in key.items()):
                return row
        start = time.perf_counter()
        ppl, cache = perplexity(model, self.windows, policy)
        text_slots = float(np.asarray(cache.lengths()).mean())
        scores = {task: recall_accuracy(model, policy, samples) for task, samples in self.samples.items()}
        accuracy = {task: acc for task, (acc, _) in scores.items()}
        if nbytes is None:  # DMC: the bytes its learned merging leaves on text, as many slots as in use
            nbytes = row_bytes(method, max(round(text_slots), 1))
        row = dict(key, capacity=policy.capacity, kib=nbytes / 1024, perplexity=ppl, **accuracy, text_slots=text_slots,
                   recall_slots={task: slots for task, (_, slots) in scores.items()}, seconds=round(time.perf_counter() - start, 1))
        tqdm.write(f"{method:<14} {model_name:<14} {policy.capacity:>5} slots {row['kib']:7.1f} KiB/row  "
                   f"perplexity {ppl:6.3f}  " + "  ".join(f"{task} {acc:.2f}" for task, acc in accuracy.items()))
        self.rows.append(row)
        append_jsonl(self.path, row)
        jax.clear_caches()  # each cell compiles its own programs; keeping all, the first full run ran out of LLVM's memory maps at cell 41
        return row


def evaluate(cells: Cells, models: dict, owners, crs, matched: list[str]) -> None:
    """Every cell: the full cache, the trained methods, the baselines at `FRACTIONS` of the full bytes and
    the `matched` baselines at each trained method's own bytes."""
    full = row_bytes("full", T)
    cells.add("full", "pretrained", models["pretrained"], kvjax.policies.make("full", capacity=T), full, 1.0)
    cells.add("full", "continued", models["continued"], kvjax.policies.make("full", capacity=T), full, 1.0)
    pod_options = dict(owners=owners, sinks=SINKS, window=WINDOW)
    pod_bytes = row_bytes("pod", T, **pod_options)
    cells.add("pod", "pretrained", models["pretrained"], pod(T, owners), pod_bytes)
    methods = [cells.add("pod", "post-trained", models["pod"], pod(T, owners), pod_bytes),
               cells.add("pod+snapkv", "post-trained", models["pod"], pod(T // 2, owners, select="snapkv"),
                         row_bytes("pod", T // 2, select="snapkv", **pod_options))]
    for cr in crs:
        name = f"dmc-{cr:g}x"
        methods.append(cells.add("dmc", name, models[name], kvjax.policies.make("dmc", capacity=T), None))
        cells.add("dmc (hard capacity)", name, models[name], at_bytes("dmc", int(full / cr)), int(full / cr), 1 / cr)
    for fraction in FRACTIONS:
        for name in BASELINES:
            cells.add(name, "continued", models["continued"], at_bytes(name, int(full * fraction)), int(full * fraction), fraction)
    for method in methods:
        nbytes = round(method["kib"] * 1024)
        for name in matched:
            cells.add(name, "continued", models["continued"], at_bytes(name, nbytes), nbytes, round(nbytes / full, 4))


def quality(row: dict) -> str:
    return " / ".join(f"{row[task]:.2f}" for task in TASKS) + f" / {row['perplexity']:.3f}"


def summary(rows: list[dict]) -> str:
    """Per trained method: quality at its bytes, the pretrained model's with the same cache where it has one,
    and the best baseline (by recall, then perplexity) at the same bytes."""
    metrics = " / ".join([*TASKS, "perplexity"])
    lines = [f"| method | model | KiB per row | {metrics} | before training | best baseline at these bytes | its {metrics} |",
             "|---|---|---:|---|---|---|---|"]
    for r in rows:
        if r["method"] not in ("pod", "pod+snapkv", "dmc") or r["model"] == "pretrained":
            continue
        before = [b for b in rows if b["method"] == r["method"] and b["model"] == "pretrained"]
        untrained = "— (no untrained form)" if r["method"] == "dmc" else "not run"
        peers = [b for b in rows if b["method"] in BASELINES and abs(b["kib"] - r["kib"]) < 1]
        best = max(peers, key=lambda b: (*(b[task] for task in TASKS), -b["perplexity"]), default=None)
        peer = f"{best['method']} ({best['capacity']} slots) | {quality(best)}" if best else "not run | "
        lines.append(f"| {r['method']} | {r['model']} | {r['kib']:.0f} | {quality(r)} | "
                     f"{quality(before[0]) if before else untrained} | {peer} |")
    return "\n".join(lines)


def train_seconds(log: list[dict] | dict, tokens_per_step: int) -> float:
    """Training time of a stage's log (or a dict of stage logs), from its per-step throughput."""
    if isinstance(log, dict):
        return sum(train_seconds(stage, tokens_per_step) for stage in log.values())
    return sum(tokens_per_step / rec["tokens_per_s"] for rec in log)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | model | slots/layer | KiB per row | of full | " + " | ".join(TASKS) + " | held-out perplexity |",
             "|---|---|---:|---:|---:|" + "---:|" * (len(TASKS) + 1)]
    full = next(r["kib"] for r in rows if r["method"] == "full")
    for r in sorted(rows, key=lambda r: (-r["kib"], r["method"])):
        slots = f"{r['text_slots']:.0f} (mean)" if r["method"] == "dmc" else str(r["capacity"])
        lines.append(f"| {r['method']} | {r['model']} | {slots} | {r['kib']:.0f} | {r['kib'] / full:.2f} | "
                     + " | ".join(f"{r[task]:.2f}" for task in TASKS) + f" | {r['perplexity']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Each task's accuracy and the perplexity against cache bytes: a curve per baseline, a marker per trained method."""
    import matplotlib.pyplot as plt

    metrics = [*TASKS, "perplexity"]
    fig, (*axes, key) = plt.subplots(1, len(metrics) + 1, figsize=(6 * len(metrics) + 3, 4.8),
                                     gridspec_kw=dict(width_ratios=[6] * len(metrics) + [3]))
    for ax, metric in zip(axes, metrics):
        for r in rows:
            if r["method"] == "full":
                ax.axhline(r[metric], color="k", ls=":" if r["model"] == "pretrained" else "-.", label=f"full cache, {r['model']}")
        for name in BASELINES:
            pts = sorted((r["kib"], r[metric]) for r in rows if r["method"] == name)
            ax.plot(*zip(*pts), "s--", ms=5, label=name)
        for r in rows:
            if r["method"] not in BASELINES + ["full"]:
                ax.plot(r["kib"], r[metric], {"dmc": "o", "dmc (hard capacity)": "x", "pod": "D", "pod+snapkv": "P"}[r["method"]],
                        ms=9, label=f"{r['method']}, {r['model']}", fillstyle="none" if r["model"] == "pretrained" else "full")
        pairs = TASKS.get(metric)
        ax.set(xlabel="cache KiB per row", xscale="log", ylabel="held-out perplexity (bytes)" if pairs is None else "exact-match accuracy",
               title="text perplexity, 1,024-byte windows" if pairs is None else
               f"{metric}: {'one pair' if pairs == 1 else f'{pairs} pairs'} in {T - 2:,} bytes, then a key")
    axes[-1].set_yscale("log")
    key.axis("off")  # the legend gets its own panel, over no curve
    key.legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu", help="preset for the flags below left unset")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--steps", type=int, help="steps of each continued, retrofit and post-training run")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--crs", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--cr-weight", type=float, default=10.0, help="weight of DMC's compression loss")
    ap.add_argument("--delta", type=float, default=0.5, help="POD's similarity threshold")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--samples", type=int, help="questions per task")
    ap.add_argument("--windows", type=int, help="held-out text windows of 1,024 bytes")
    ap.add_argument("--matched", nargs="*", default=BASELINES, help="baselines also run at each trained method's own bytes")
    ap.add_argument("--workdir", default="results/recall")
    ap.add_argument("--out", default="docs/measurements")
    args = with_scale(ap.parse_args(argv), SCALES)
    workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
    start = time.time()

    train_text, held = corpus()
    model, pre_log = pretrained(train_text, args.pretrain_steps, args.batch, workdir / f"pretrain-{args.pretrain_steps}")
    lookup = {stage[0]: lookup_accuracy(model, stage_rows(train_text, stage, 4, seed=2, recall_fraction=1.0)(0))
              for stage in CURRICULUM}  # fresh rows of each stage, every one with pairs
    print("pretrained look-up accuracy on the byte after a key, by row bytes:", lookup)
    tag = f"{args.pretrain_steps}-{args.steps}"
    batches = recall.RecallMix(train_text, T, args.batch, seed=1)  # later stages go on with new batches of the same mix
    models, logs = {"pretrained": model}, {}
    calibration = held[-4 * T :].reshape(4, T)  # held-out bytes beyond the evaluated windows
    owners = kvjax.calibrate.pod_blocks(model, calibration, delta=args.delta, sinks=SINKS, window=WINDOW)
    models["pod"] = nnx.clone(model)
    logs["pod"] = run_stage(models["pod"], retrofit.language_model_loss(retrofit.pod_attention(owners, sinks=SINKS, window=WINDOW)),
                            batches, args.steps, args.lr, workdir / f"pod-d{args.delta:g}-{tag}", f"POD δ={args.delta:g}")
    for cr in args.crs:
        models[f"dmc-{cr:g}x"], logs[f"dmc-{cr:g}x"] = retrofit_model(model, cr, args.steps, args.lr, batches,
                                                                     workdir / f"dmc{cr:g}-{tag}", args.cr_weight)
    models["continued"] = nnx.clone(model)
    logs["continued"] = run_stage(models["continued"], retrofit.language_model_loss(), batches, args.steps, args.lr,
                                  workdir / f"continued-{tag}", "continued")
    n = min(args.windows, (len(held) - 4 * T) // T)
    samples = {task: recall.samples(held[: -4 * T], T - recall.ANSWER_BYTES, args.samples, pairs=pairs, seed=1)
               for task, pairs in TASKS.items()}
    cells = Cells(workdir / f"cells-{tag}-{args.samples}-{n}.jsonl", held[: n * T].reshape(n, T), samples)
    evaluate(cells, models, owners, args.crs, args.matched)
    per_step = args.batch * T
    result = dict(config=vars(args), model=CONFIG.__dict__, pod_owners=owners, lookup_accuracy=lookup,
                  this_process_wall_s=round(time.time() - start),  # a resumed run's own; the seconds below sum every run's
                  tokens_trained={"pretrain": len(pre_log) * per_step, "per_later_model": args.steps * per_step},
                  train_seconds={"pretrain": round(train_seconds(pre_log, per_step)),
                                 **{name: round(train_seconds(log, per_step)) for name, log in logs.items()}},
                  eval_seconds=round(sum(r["seconds"] for r in cells.rows)), rows=cells.rows, pretrain_log=pre_log, logs=logs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recall_testbed.json", result)
    tables = summary(cells.rows) + "\n\n" + markdown(cells.rows)
    (out / "recall_testbed.md").write_text(tables + "\n")
    print(tables)
    plot(cells.rows, out / "recall_testbed.png")
    return result


if __name__ == "__main__":
    main()
