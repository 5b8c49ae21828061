"""DMC at small scale: pretrain a byte-level Llama on Austen + Shakespeare, retrofit it, compare.

1. Pretrain a 4-layer GQA Llama (vocab 256: UTF-8 bytes) from scratch on
   Austen's six novels and Shakespeare's plays (98%; the last 2% is held out).
2. Retrofit a copy per target CR with the authors' three stages (arXiv 2403.09636, Sec. 4):
   zero-out of the decision dimension (10% of the steps), DMC with the CR
   ramped linearly (60%), fine-tuning at the fixed CR (30%).
   A control copy is trained as long without DMC ("continued"), so every
   compared model has seen the same tokens.
3. Held-out perplexity of the second half of 512-byte windows:
   - the untouched and the continued model with the full cache;
   - each retrofitted model through the `dmc` inference cache (capacity 512,
     so merging is all learned), which gives its achieved CR per layer and head;
   - the continued model with h2o / tova / streaming_llm / kvmerger at the
     same cache size (capacity = 512 / achieved CR, the DMC cache's mean final length);
   - the retrofitted model under that hard capacity (`dmc` forcing merges),
     the same for every layer or split by its learned per-layer lengths
     (`plan_capacity(per_layer=...)`, same total).

Every stage checkpoints into --workdir and resumes if interrupted. Writes
JSON and a plot into --out.

    python -m experiments.dmc_replication [--scale cpu|accelerator] [--pretrain-steps 700] [--retrofit-steps 500] [--cr-weight 10] [--crs 2 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np
from flax import nnx

import kvjax
from experiments import corpora
from experiments.results import write_json
from kvjax import retrofit
from kvjax.data import PackedBatches, byte_tokens, held_out_split, join
from kvjax.train import TrainConfig, train
from models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(
    vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
)
BASELINES = ["h2o", "tova", "streaming_llm", "kvmerger"]


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) byte streams; documents separated by a 0 byte, 2% of each held out."""
    parts = [held_out_split(byte_tokens(doc), 0.02) for doc in corpora.austen() + corpora.shakespeare()]
    return join([p[0] for p in parts], separator=0), join([p[1] for p in parts], separator=0)


def stage_log(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --scale presets, for flags not given: "cpu" is what the README reports (this 2-core machine); "accelerator" is a
# longer budget for a lent GPU/TPU (not run yet).
SCALES = {
    "cpu": dict(pretrain_steps=700, retrofit_steps=500, batch=8),
    "accelerator": dict(pretrain_steps=8000, retrofit_steps=4000, batch=32),
}


def with_scale(args: argparse.Namespace, presets: dict[str, dict]) -> argparse.Namespace:
    """Fill the flags left unset (None) from the `--scale` preset."""
    for name, value in presets[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def pretrained(train_tokens: np.ndarray, steps: int, batch: int, seq_len: int, workdir: pathlib.Path) -> tuple[Llama, list[dict]]:
    """The byte-level model pretrained from scratch (resumed or read back from `workdir`), and its log."""
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    log = run_stage(model, retrofit.language_model_loss(), PackedBatches(train_tokens, seq_len, batch, seed=0),
                    steps, 2e-3, workdir, "pretrain", warmup=min(50, steps // 10))
    return model, log


def run_stage(model, loss, batches, steps: int, lr: float, workdir: pathlib.Path, name: str, warmup: int = 0) -> list[dict]:
    train(model, loss, batches, TrainConfig(steps=steps, learning_rate=lr, warmup_steps=warmup, checkpoint_every=100),
          workdir=workdir, description=name)
    return stage_log(workdir)


def retrofit_model(base: Llama, cr: float, steps: int, lr: float, batches, workdir: pathlib.Path, weight: float) -> tuple[Llama, dict]:
    """The three stages; returns the model and each stage's log. `weight` multiplies the compression
    loss: the hinge's gradient does not depend on the target, so the weight sets how hard it pulls."""
    model = nnx.clone(base)
    zero, ramp = steps // 10, steps * 6 // 10
    logs = {
        "zero_out": run_stage(model, retrofit.zero_out_loss(zero), batches, zero, lr, workdir / "zero_out", f"CR {cr:g} zero-out"),
        "retrofit": run_stage(model, retrofit.dmc_loss(cr, ramp, weight=weight), batches, ramp, lr, workdir / "retrofit", f"CR {cr:g} retrofit"),
        "finetune": run_stage(model, retrofit.dmc_loss(cr, weight=weight), batches, steps - zero - ramp, lr, workdir / "finetune", f"CR {cr:g} finetune"),
    }
    model.cfg = dataclasses.replace(model.cfg, dmc_decisions=True)  # its decision dimension is trained now
    return model, logs


def perplexity(model, windows: np.ndarray, policy: kvjax.Policy) -> tuple[float, kvjax.KVCache]:
    """Perplexity of the second half of each window, and the final cache."""
    nll, cache = kvjax.evaluate.stream_nll(model, windows, policy=policy, chunk_size=64, with_cache=True)
    return float(np.exp(np.asarray(nll)[:, windows.shape[1] // 2 :].mean())), cache


def make_baseline(name: str, capacity: int) -> kvjax.Policy:
    if name == "kvmerger":  # merge in every layer: excluding layers 0, 1 and -1 would leave one of four
        return kvjax.policies.make(name, capacity=capacity, exclude_layers=())
    return kvjax.policies.make(name, capacity=capacity)


def evaluate(untouched: Llama, continued: Llama, retrofitted: dict[float, Llama], windows: np.ndarray) -> list[dict]:
    t = windows.shape[1]
    rows = []
    for name, model in (("untouched", untouched), ("continued", continued)):
        full, _ = perplexity(model, windows, kvjax.policies.make("full", capacity=t))
        rows.append(dict(method="full", model=name, target_cr=1.0, cr=1.0, capacity=t, perplexity=full))
        print(f"{name}, full cache: {full:.3f}")
    for cr, model in retrofitted.items():
        ppl, cache = perplexity(model, windows, kvjax.policies.make("dmc", capacity=t))
        per_head = np.asarray(cache.compression_ratio()).mean(1)  # [L, H], averaged over windows
        achieved = t / float(np.asarray(cache.lengths()).mean())
        capacity = int(round(t / achieved))
        rows.append(dict(method="dmc", model=f"dmc-{cr:g}x", target_cr=cr, cr=achieved, capacity=t, perplexity=ppl,
                         cr_per_layer_head=per_head.round(3).tolist()))
        print(f"DMC {cr:g}x: achieved CR {achieved:.2f}, perplexity {ppl:.3f}; per layer {per_head.mean(-1).round(2).tolist()}")
        ppl_c, _ = perplexity(model, windows, kvjax.policies.make("dmc", capacity=capacity))
        rows.append(dict(method="dmc (hard capacity)", model=f"dmc-{cr:g}x", target_cr=cr, cr=t / capacity, capacity=capacity, perplexity=ppl_c))
        plan = kvjax.plan_capacity(CONFIG, tokens=capacity, policy="dmc", per_layer=list((1 / per_head).mean(-1)))  # mean slots per layer
        ppl_p, _ = perplexity(model, windows, plan.policy())
        rows.append(dict(method="dmc (per-layer capacity)", model=f"dmc-{cr:g}x", target_cr=cr, cr=t / capacity, capacity=capacity,
                         perplexity=ppl_p, layer_slots=list(plan.slots)))
        print(f"  dmc under a hard capacity {capacity}: {ppl_c:.3f}; per layer {plan.slots}: {ppl_p:.3f}")
        for name in BASELINES:
            ppl_b, _ = perplexity(continued, windows, make_baseline(name, capacity))
            rows.append(dict(method=name, model="continued", target_cr=cr, cr=t / capacity, capacity=capacity, perplexity=ppl_b))
            print(f"  {name} at capacity {capacity}: {ppl_b:.3f}")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| target CR | method | model | cache slots (of 512) | achieved CR | held-out perplexity |", "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        slots = f"{512 / r['cr']:.0f} (mean)" if r["method"] == "dmc" else str(r["capacity"])
        lines.append(f"| {r['target_cr']:g} | {r['method']} | {r['model']} | {slots} | {r['cr']:.2f} | {r['perplexity']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], logs: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("no plot: pip install matplotlib (or the kvjax[plots] extra)")
        return
    fig, (ax, ax_cr, ax_ce) = plt.subplots(1, 3, figsize=(15, 4))
    for r, style in zip((r for r in rows if r["method"] == "full"), (":", "-.")):
        ax.axhline(r["perplexity"], color="k", ls=style, label=f"{r['model']}, full cache")
    for method in ["dmc", "dmc (hard capacity)", "dmc (per-layer capacity)", *BASELINES]:
        pts = sorted((r["cr"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), "o-" if method.startswith("dmc") else "s--", label=method)
    ax.set(xlabel="compression ratio (512 / cache slots)", ylabel="held-out perplexity (bytes, log scale)", title="quality at equal cache size", yscale="log")
    ax.legend(fontsize=8)
    for cr, stages in logs.items():
        steps, cr_curve, ce_curve, offset = [], [], [], 0
        for stage in ("zero_out", "retrofit", "finetune"):
            for rec in stages[stage]:
                steps.append(offset + rec["step"])
                cr_curve.append(rec.get("cr", 1.0))
                ce_curve.append(rec.get("ce", rec["loss"]))
            offset += len(stages[stage])
        ax_cr.plot(steps, cr_curve, label=f"target {cr:g}x")
        ax_ce.plot(steps, ce_curve, label=f"target {cr:g}x")
    ax_cr.set(xlabel="retrofit step", ylabel="achieved CR (training batch)", title="compression learned")
    ax_ce.set(xlabel="retrofit step", ylabel="cross-entropy (nats/byte)", title="language-model loss")
    ax_cr.legend(), ax_ce.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu", help="preset for the flags below left unset")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--retrofit-steps", type=int)
    ap.add_argument("--crs", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--cr-weight", type=float, default=10.0, help="weight of the compression loss (open in the spec)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int, default=512, help="trained length = evaluated window (RoPE beyond it is untrained)")
    ap.add_argument("--windows", type=int, default=32, help="held-out 512-byte windows")
    ap.add_argument("--workdir", default="results/dmc_replication")
    ap.add_argument("--out", default="docs/measurements")
    args = with_scale(ap.parse_args(), SCALES)
    workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
    start = time.time()

    train_tokens, held = corpus()
    print(f"corpus: {len(train_tokens):,} training bytes, {len(held):,} held out")
    model, pre_log = pretrained(train_tokens, args.pretrain_steps, args.batch, args.seq_len, workdir / f"pretrain-{args.pretrain_steps}")
    batches = PackedBatches(train_tokens, args.seq_len, args.batch, seed=1)  # retrofitting continues on new batches
    retrofitted, logs = {}, {}
    for cr in args.crs:
        retrofitted[cr], logs[cr] = retrofit_model(model, cr, args.retrofit_steps, 5e-4, batches, workdir / f"cr{cr:g}-w{args.cr_weight:g}", args.cr_weight)
    n = min(args.windows, len(held) // 512)
    windows = held[: n * 512].reshape(n, 512)
    continued = nnx.clone(model)
    control_log = run_stage(continued, retrofit.language_model_loss(), batches, args.retrofit_steps, 5e-4, workdir / "continued", "continued")
    rows = evaluate(model, continued, retrofitted, windows)
    tokens = {"pretrain": len(pre_log) * args.batch * args.seq_len,
              "retrofit_per_model": args.retrofit_steps * args.batch * args.seq_len}
    result = dict(config=vars(args), model=CONFIG.__dict__, tokens_trained=tokens, wall_s=round(time.time() - start),
                  rows=rows, pretrain_log=pre_log, continued_log=control_log, retrofit_logs={f"{cr:g}": v for cr, v in logs.items()})
    write_json(out / "dmc_replication.json", result)
    print(markdown(rows))
    plot(rows, logs, out / "dmc_replication.png")


if __name__ == "__main__":
    main()
