"""Main job: a real model, a real essay, every policy at one fixed capacity, side by side.

Loads SmolLM2-135M (from the registry package, see README), reads the start of
Paul Graham's "What I Worked On", and for `full` and each compressing policy
at the same capacity prints: the generated continuation, the perplexity of
the essay's real continuation given the prompt, cache bytes, and tokens/s.

    python -m experiments.demo [--model smollm2-135m|tiny] [--capacity 256] [--policies ...]
"""

from __future__ import annotations

import argparse
import textwrap
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

import kvjax
from experiments.texts import essay
from kvjax.evaluate import stream_nll
from models import Llama, LlamaConfig, load

DEFAULT_POLICIES = ["full", "streaming_llm", "h2o", "snapkv"]


def build_policy(name: str, capacity: int, full_capacity: int) -> kvjax.Policy:
    if name == "full":
        return kvjax.policies.make("full", capacity=full_capacity)
    options = {"snapkv": dict(window=min(32, capacity)), "pyramidkv": dict(window=8, beta=4.0)}
    return kvjax.policies.make(name, capacity=capacity, **options.get(name, {}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models.load source, or 'tiny' (random weights, bytes)")
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--eval-tokens", type=int, default=256, help="real continuation scored for perplexity")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, choices=kvjax.policies.names())
    args = parser.parse_args(argv)

    text = essay("worked")
    if args.model == "tiny":
        model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
        ids, decode = np.frombuffer(text.encode(), np.uint8).astype(np.int32), lambda t: bytes(np.asarray(t, np.uint8)).decode("latin-1")
    else:
        model, tokenizer = load(args.model)
        ids, decode = np.asarray(tokenizer.encode(text), np.int32), tokenizer.decode
    n = args.prompt_tokens
    prompt, scored = ids[None, :n], ids[None, : n + args.eval_tokens]
    cfg = model.cfg
    print(f"model {args.model}: {cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads; "
          f"prompt {n} tokens of 'What I Worked On', {args.new_tokens} new; capacity {args.capacity}\n")

    rows = []
    for name in tqdm(args.policies, desc="policies", unit="policy"):
        policy = build_policy(name, args.capacity, n + max(args.new_tokens, args.eval_tokens))
        run = lambda: kvjax.generate(model, prompt, policy=policy, max_new_tokens=args.new_tokens, chunk_size=args.chunk_size)  # noqa: E731
        jax.block_until_ready(run())  # compile
        start = time.perf_counter()
        out = jax.block_until_ready(run())
        seconds = time.perf_counter() - start
        nll = np.asarray(stream_nll(model, scored, policy=policy, chunk_size=args.chunk_size))[0, n - 1 :]
        rows.append(dict(
            policy=name, cache_mib=out.cache.nbytes / 2**20, tok_s=(n + args.new_tokens) / seconds,
            ppl=float(np.exp(nll.mean())), text=decode(out.tokens[0, : int(out.lengths[0])]),
        ))

    print(f"\n{'policy':<14} {'cache MiB':>9} {'tokens/s':>9} {'ppl of next ' + str(args.eval_tokens):>16}")
    for r in rows:
        print(f"{r['policy']:<14} {r['cache_mib']:>9.2f} {r['tok_s']:>9.0f} {r['ppl']:>16.2f}")
    print("\nfirst words generated after the prompt:")
    for r in rows:
        print(f"  {r['policy']:<14} " + textwrap.shorten(r["text"].replace("\n", " "), 110))
    return rows


if __name__ == "__main__":
    main()
