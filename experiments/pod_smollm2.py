"""POD's post-training on SmolLM2-135M on a CPU budget, compared at equal bytes.

POD (arXiv 2412.02252) shares the distant keys of a block of layers and then
post-trains the model under that attention (Sec. 3.3); without the training it
collapses on SmolLM2 (`experiments/seed_methods.py`). Here, per threshold delta:
1. layer blocks calibrated on one essay ("founders",
   1,024 tokens; `kvjax.calibrate.pod_blocks`);
2. a copy post-trained with the language-model loss under POD's attention
   (`kvjax.retrofit.pod_attention`) on Austen's novels in SmolLM2's tokens;
   a control copy trains as long with ordinary attention ("continued");
3. the perplexity of the second half of "What I Worked On" (2,048 tokens, a
   different domain from the training text), streamed through each cache:
   - the full cache, untouched and continued;
   - POD keeping every token (its saving is the shared keys alone), before and
     after post-training;
   - H2O at POD's bytes, on the untouched and the continued model;
   - POD + SnapKV at half the slots, before and after, against H2O at its bytes.

Each training run checkpoints into --workdir and resumes if interrupted.

    python -m experiments.pod_smollm2 [--scale cpu|accelerator] [--steps N] [--deltas 0.5 0.8] [--batch N] [--seq-len N]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
from flax import nnx

import kvjax
from experiments import corpora
from experiments.dmc_replication import run_stage, with_scale
from experiments.pod_replication import h2o_at, report, row_bytes
from experiments.texts import essay
from kvjax import retrofit
from kvjax.data import PackedBatches, join
from models import load

SINKS, WINDOW = 16, 64


def evaluate(untouched, continued, trained: dict, blocks: dict, ids: np.ndarray) -> list[dict]:
    """One row per (cache, model): perplexity of the second half of `ids` and the cache's bytes per row."""
    t = ids.shape[1]
    rows = []

    def add(method, model_name, delta, policy, model, nbytes):
        ppl = kvjax.evaluate.perplexity(model, ids, policy=policy, chunk_size=256, start=t // 2)
        rows.append(dict(method=method, model=model_name, delta=delta, capacity=policy.capacity, kib=nbytes / 1024, perplexity=ppl))
        print(f"{method:<11} {model_name:<22} capacity {policy.capacity:>5} {nbytes / 2**20:6.2f} MiB/row  perplexity {ppl:.3f}")

    def pod(capacity, owners, **options):
        return kvjax.policies.make("pod", capacity=capacity, sinks=SINKS, window=WINDOW, owners=owners, **options)

    full_bytes = row_bytes(untouched, "full", t)
    for name, model in (("untouched", untouched), ("continued", continued)):
        add("full", name, None, kvjax.policies.make("full", capacity=t), model, full_bytes)
    for delta, owners in blocks.items():
        for capacity, options in ((t, {}), (t // 2, dict(select="snapkv"))):
            method = "pod+snapkv" if options else "pod"
            nbytes = row_bytes(untouched, "pod", capacity, owners=owners, sinks=SINKS, window=WINDOW, **options)
            add(method, "untouched", delta, pod(capacity, owners, **options), untouched, nbytes)
            add(method, f"post-trained δ={delta:g}", delta, pod(capacity, owners, **options), trained[delta], nbytes)
            for name, model in (("untouched", untouched), ("continued", continued)):
                add("h2o", name, delta, h2o_at(untouched, nbytes), model, nbytes)
    return rows


# --scale presets, for flags not given: "cpu" is the README's run (0.2M tokens per model on 2 cores); "accelerator"
# is about 33M tokens per model at 2k context, our estimate of what closing the gap to eviction needs (not run yet).
SCALES = {
    "cpu": dict(steps=200, batch=2, seq_len=512, lr=1e-4),
    "accelerator": dict(steps=2000, batch=8, seq_len=2048, lr=1e-4),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu", help="preset for the flags below left unset")
    ap.add_argument("--steps", type=int, help="post-training steps per delta (and for the control)")
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--workdir", default="results/pod_smollm2")
    ap.add_argument("--out", default="docs/measurements")
    args = with_scale(ap.parse_args(argv), SCALES)
    workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
    start = time.time()

    model, tokenizer = load("smollm2-135m")
    text = join([np.asarray(tokenizer.encode(novel), np.int32) for novel in corpora.austen()], separator=tokenizer.eos_id)
    print(f"training text: {len(text):,} tokens of Austen")
    calibration = np.asarray(tokenizer.encode(essay("founders")), np.int32)[None, :1024]
    ids = np.asarray(tokenizer.encode(essay("worked")), np.int32)[None, : args.context]
    if ids.shape[1] < args.context:
        raise ValueError(f"the essay has {ids.shape[1]} tokens, fewer than --context {args.context}")
    batches = PackedBatches(text, args.seq_len, args.batch, seed=2)
    blocks, trained, logs, train_s = {}, {}, {}, {}
    for delta in args.deltas:
        blocks[delta] = kvjax.calibrate.pod_blocks(model, calibration, delta=delta, sinks=SINKS, window=WINDOW, queries=64, chunk_size=128)
        shared = sum(o != layer for layer, row in enumerate(blocks[delta]) for o in row)
        print(f"δ={delta:g}: {shared} of {sum(map(len, blocks[delta]))} (layer, KV head) pairs read another layer's distant keys")
        trained[delta] = nnx.clone(model)
        loss = retrofit.language_model_loss(retrofit.pod_attention(blocks[delta], sinks=SINKS, window=WINDOW))
        t0 = time.time()
        logs[f"{delta:g}"] = run_stage(trained[delta], loss, batches, args.steps, args.lr, workdir / f"pod-d{delta:g}-{args.steps}",
                                       f"POD δ={delta:g}", warmup=args.warmup)
        train_s[f"{delta:g}"] = round(time.time() - t0)
    continued = nnx.clone(model)
    t0 = time.time()
    control_log = run_stage(continued, retrofit.language_model_loss(), batches, args.steps, args.lr, workdir / f"continued-{args.steps}",
                            "continued", warmup=args.warmup)
    train_s["continued"] = round(time.time() - t0)
    rows = evaluate(model, continued, trained, blocks, ids)
    result = dict(config=vars(args), sinks=SINKS, window=WINDOW, blocks={f"{d:g}": b for d, b in blocks.items()},
                  tokens_trained_per_model=args.steps * args.batch * args.seq_len, train_wall_s=train_s,
                  wall_s=round(time.time() - start), rows=rows, logs=logs, continued_log=control_log)
    return report(result, out, "pod_smollm2", tokens="SmolLM2 tokens")


if __name__ == "__main__":
    main()
