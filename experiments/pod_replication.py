"""POD's post-training at small scale: calibrate the layer blocks, post-train, compare at equal bytes.

1. The byte-level Llama of `experiments.dmc_replication`, pretrained on Austen and
   Shakespeare (its checkpoint is shared: a finished pretraining is read back).
2. Per similarity threshold delta: POD's layer blocks calibrated on held-out text
   (`kvjax.calibrate.pod_blocks`), then a copy post-trained with the language-model
   loss under POD's attention (`kvjax.retrofit.pod_attention`; arXiv 2412.02252,
   Sec. 3.3: proximal keys its own, distant keys the block owner's). A control copy
   trains as long with ordinary attention ("continued"), so every compared model
   has seen the same tokens.
3. Held-out perplexity of the second half of 512-byte windows:
   - the full cache, untouched and continued;
   - POD keeping every token (capacity 512, the paper's setting: sharing keys is
     the only saving), before post-training (untouched model) and after;
   - H2O on the continued model at POD's bytes (as many slots as those bytes hold);
   - POD + SnapKV at half the slots (its ring keeps the best-voted distant tokens),
     after post-training, against H2O at the same bytes.

Each training run checkpoints into --workdir and resumes if interrupted. Writes
JSON, a markdown table and a plot into --out.

    python -m experiments.pod_replication [--scale cpu|accelerator] [--steps 200] [--deltas 0.5 0.8]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
from flax import nnx

import kvjax
from experiments.dmc_replication import CONFIG, corpus, perplexity, pretrained, run_stage, with_scale
from experiments.results import save_figure, write_json
from kvjax import retrofit
from kvjax.data import PackedBatches

SINKS, WINDOW, T = 16, 64, 512
SCALES = {  # as experiments.dmc_replication's (its pretraining is shared); "accelerator" has not run yet
    "cpu": dict(pretrain_steps=700, steps=200, batch=8),
    "accelerator": dict(pretrain_steps=8000, steps=4000, batch=32),
}


def pod(capacity: int, owners, **options) -> kvjax.Policy:
    return kvjax.policies.make("pod", capacity=capacity, sinks=SINKS, window=WINDOW, owners=owners, **options)


def row_bytes(model, policy_name: str, capacity: int, **options) -> int:
    """Cache bytes of one row (POD's planned by its measured layout: owners' keys only)."""
    return kvjax.plan_capacity(model, tokens=capacity, policy=policy_name, **options).nbytes


def h2o_at(model, nbytes: int) -> kvjax.Policy:
    """H2O with as many slots as `nbytes` per row hold."""
    return kvjax.plan_capacity(model, nbytes, policy="h2o").policy().inner


def evaluate(untouched, continued, trained: dict[float, object], blocks: dict[float, tuple], windows: np.ndarray) -> list[dict]:
    rows = []

    def add(method, model_name, delta, policy, model, nbytes):
        ppl, _ = perplexity(model, windows, policy)
        rows.append(dict(method=method, model=model_name, delta=delta, capacity=policy.capacity, kib=nbytes / 1024, perplexity=ppl))
        print(f"{method:<12} {model_name:<22} capacity {policy.capacity:>3} {nbytes / 1024:7.1f} KiB/row  perplexity {ppl:.3f}")

    full_bytes = row_bytes(CONFIG, "full", T)
    for name, model in (("untouched", untouched), ("continued", continued)):
        add("full", name, None, kvjax.policies.make("full", capacity=T), model, full_bytes)
    for delta, owners in blocks.items():
        shared = row_bytes(CONFIG, "pod", T, owners=owners, sinks=SINKS, window=WINDOW)
        add("pod", "untouched", delta, pod(T, owners), untouched, shared)
        add("pod", f"post-trained δ={delta:g}", delta, pod(T, owners), trained[delta], shared)
        add("h2o", "continued", delta, h2o_at(CONFIG, shared), continued, shared)
        half = row_bytes(CONFIG, "pod", T // 2, owners=owners, sinks=SINKS, window=WINDOW, select="snapkv")
        add("pod+snapkv", f"post-trained δ={delta:g}", delta, pod(T // 2, owners, select="snapkv"), trained[delta], half)
        add("h2o", "continued", delta, h2o_at(CONFIG, half), continued, half)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| δ | method | model | slots/layer | KiB per row | held-out perplexity |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        delta = "-" if r["delta"] is None else f"{r['delta']:g}"
        lines.append(f"| {delta} | {r['method']} | {r['model']} | {r['capacity']} | {r['kib']:.1f} | {r['perplexity']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, tokens: str = "bytes") -> None:
    """Perplexity against cache bytes per row: the full cache, POD before and after post-training, H2O at the same bytes."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        at = f" at the bytes of δ={r['delta']:g}" if r["method"] == "h2o" else ""
        ax.plot(r["kib"], r["perplexity"], {"full": "*", "pod": "o", "pod+snapkv": "D", "h2o": "s"}[r["method"]], ms=8,
                label=f"{r['method']}, {r['model']}{at}", fillstyle="none" if r["model"] == "untouched" and r["method"] == "pod" else "full")
    ax.set(xlabel="cache KiB per row", ylabel=f"held-out perplexity ({tokens}, log scale)", yscale="log",
           title="POD before and after post-training, at equal bytes")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu", help="preset for the flags below left unset")
    ap.add_argument("--pretrain-steps", type=int, help="as experiments.dmc_replication (its checkpoint is reused)")
    ap.add_argument("--steps", type=int, help="post-training steps per delta (and for the control)")
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--windows", type=int, default=32, help="held-out 512-byte windows")
    ap.add_argument("--workdir", default="results/dmc_replication", help="shared with dmc_replication (pretrain/)")
    ap.add_argument("--out", default="docs/measurements")
    args = with_scale(ap.parse_args(argv), SCALES)
    workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
    start = time.time()

    train_tokens, held = corpus()
    model, pre_log = pretrained(train_tokens, args.pretrain_steps, args.batch, T, workdir / f"pretrain-{args.pretrain_steps}")
    calibration = held[-4 * T :].reshape(4, T)  # held-out bytes not among the evaluated windows
    n = min(args.windows, (len(held) - 4 * T) // T)
    windows = held[: n * T].reshape(n, T)
    batches = PackedBatches(train_tokens, T, args.batch, seed=2)
    blocks, trained, logs = {}, {}, {}
    for delta in args.deltas:
        blocks[delta] = kvjax.calibrate.pod_blocks(model, calibration, delta=delta, sinks=SINKS, window=WINDOW)
        shared = sum(o != layer for layer, row in enumerate(blocks[delta]) for o in row)
        print(f"δ={delta:g}: {shared} of {CONFIG.num_layers * CONFIG.num_kv_heads} (layer, KV head) pairs read another layer's distant keys")
        trained[delta] = nnx.clone(model)
        loss = retrofit.language_model_loss(retrofit.pod_attention(blocks[delta], sinks=SINKS, window=WINDOW))
        logs[f"{delta:g}"] = run_stage(trained[delta], loss, batches, args.steps, args.lr, workdir / f"pod-d{delta:g}-{args.steps}", f"POD δ={delta:g}")
    continued = nnx.clone(model)
    control_log = run_stage(continued, retrofit.language_model_loss(), batches, args.steps, args.lr, workdir / f"pod-continued-{args.steps}", "continued")
    rows = evaluate(model, continued, trained, blocks, windows)
    result = dict(config=vars(args), model=CONFIG.__dict__, sinks=SINKS, window=WINDOW, blocks={f"{d:g}": b for d, b in blocks.items()},
                  tokens_trained={"pretrain": len(pre_log) * args.batch * T, "post_training_per_model": args.steps * args.batch * T},
                  wall_s=round(time.time() - start), rows=rows, logs=logs, continued_log=control_log)
    return report(result, out, "pod_replication")


def report(result: dict, out: pathlib.Path, stem: str, tokens: str = "bytes") -> dict:
    """Write `result` as JSON, its rows as a markdown table (printed too) and a plot, under `out`/`stem`.*."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result)
    table = markdown(result["rows"])
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    plot(result["rows"], out / f"{stem}.png", tokens)
    return result


if __name__ == "__main__":
    main()
