"""Retrofit SmolLM2-135M with DMC on a CPU budget, and say what the budget buys.

The authors' three stages (zero-out 10%, CR ramp 60%, fine-tune 30%; arXiv 2403.09636, Sec. 4)
on Austen's novels tokenized with SmolLM2's tokenizer, then the perplexity of
the second half of the first 1024 tokens of "What I Worked On" (a different
domain) and the achieved compression ratio through the `dmc` inference cache.
Compared: the model before retrofitting (full cache; through the `dmc` cache,
which removes the decision dimension and merges where k[d-1] > 5 already; and
h2o / tova at the retrofitted DMC cache's mean size) and after (full cache and `dmc`). The paper retrofits with ~35B tokens for 2x;
this runs tens of thousands.

    python -m experiments.dmc_smollm2 [--steps 60] [--cr 2] [--batch 2] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

import kvjax
from experiments import corpora
from experiments.dmc_replication import perplexity, retrofit_model
from experiments.results import write_json
from experiments.texts import essay
from kvjax.data import PackedBatches, join
from models import load


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--cr", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cr-weight", type=float, default=10.0, help="weight of the compression loss")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--workdir", default="results/dmc_smollm2")
    ap.add_argument("--out", default="docs/measurements")
    args = ap.parse_args()
    start = time.time()

    model, tokenizer = load("smollm2-135m")
    text = join([np.asarray(tokenizer.encode(novel), np.int32) for novel in corpora.austen()], separator=tokenizer.eos_id)
    print(f"training text: {len(text):,} tokens of Austen")
    batches = PackedBatches(text, args.seq_len, args.batch, seed=0)
    retrofitted, logs = retrofit_model(model, args.cr, args.steps, args.lr, batches, pathlib.Path(args.workdir), args.cr_weight)
    train_s = time.time() - start

    ids = np.asarray(tokenizer.encode(essay("worked"))[: args.context], np.int32)[None]
    t = ids.shape[1]
    rows = []
    for name, m in (("before", model), ("after", retrofitted)):
        for policy in ("full", "dmc"):
            ppl, cache = perplexity(m, ids, kvjax.policies.make(policy, capacity=t))
            cr = t / float(np.asarray(cache.lengths()).mean())
            per_layer = np.asarray(cache.compression_ratio()).mean((1, 2)).round(3).tolist()
            rows.append(dict(model=name, policy=policy, perplexity=ppl, cr=cr, cr_per_layer=per_layer))
            print(f"{name} retrofitting, {policy}: perplexity {ppl:.2f}, achieved CR {cr:.3f}")
    capacity = int(round(t / rows[-1]["cr"]))  # the retrofitted DMC cache's mean size
    for name in ("h2o", "tova"):
        ppl, _ = perplexity(model, ids, kvjax.policies.make(name, capacity=capacity))
        rows.append(dict(model="before", policy=name, perplexity=ppl, cr=t / capacity, capacity=capacity))
        print(f"before retrofitting, {name} at capacity {capacity}: perplexity {ppl:.2f}")
    final = logs["finetune"][-1] if logs["finetune"] else {}
    result = dict(config=vars(args), tokens_trained=args.steps * args.batch * args.seq_len, train_wall_s=round(train_s),
                  wall_s=round(time.time() - start), last_training_record=final, rows=rows, logs=logs)
    write_json(pathlib.Path(args.out) / "dmc_smollm2.json", result)


if __name__ == "__main__":
    main()
