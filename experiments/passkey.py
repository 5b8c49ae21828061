"""Passkey retrieval: digits hidden at a chosen depth of real filler text, answered greedily.

The filler is Paul Graham's essays; the needle states a random 5-digit pass key
and the prompt ends by asking for it. A trial is correct when the greedy
continuation contains the digits. Rows of one length run as one batch.

    python -m experiments.passkey [--lengths 512 1024 2048] [--depths 0.1 0.5 0.9] [--policies full h2o ...]
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

import kvjax
from experiments.results import write_json
from experiments.texts import all_essays
from models import load

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, filler: list[int], length: int, depth: float, key: str) -> list[int]:
    """`length` tokens: filler with the needle at fraction `depth` (moved to the next
    sentence end, so it never splits a word), then the question."""
    needle, question = tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION)
    body = length - len(needle) - len(question)
    if body < 1 or body > len(filler):
        raise ValueError(f"length {length} leaves {body} filler tokens; the filler has {len(filler)}")
    at = int(round(depth * body))
    while 0 < at < body and not tokenizer.decode(filler[at - 1 : at]).rstrip(" ").endswith((".", "\n")):
        at += 1
    return filler[:at] + needle + filler[at:body] + question


def run(model, tokenizer, policy_for, *, lengths, depths, trials: int, seed: int = 0) -> list[dict]:
    """Accuracy per (length, depth); `policy_for(length)` gives the policy for a prompt length."""
    rng = np.random.default_rng(seed)
    filler = tokenizer.encode(all_essays())
    rows = []
    for length in tqdm(lengths, desc="passkey lengths", unit="length"):
        # Each trial reads the filler from its own random offset and hides its own key.
        cases = [(d, str(rng.integers(10_000, 100_000)), int(rng.integers(0, len(filler) - 2 * length))) for d in depths for _ in range(trials)]
        prompts = np.asarray([passkey_prompt(tokenizer, filler[o:], length, d, k) for d, k, o in cases])
        out = kvjax.generate(model, prompts, policy=policy_for(length), max_new_tokens=8, chunk_size=256)
        answers = [tokenizer.decode(t) for t in np.asarray(out.tokens)]
        for depth in depths:
            hits = [key in answer for (d, key, _), answer in zip(cases, answers) if d == depth]
            rows.append(dict(length=length, depth=depth, accuracy=float(np.mean(hits)), trials=len(hits)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--policies", nargs="+", default=["full"], choices=kvjax.policies.names())
    parser.add_argument("--capacity", type=float, default=0.25, help="fraction of the prompt length (compressing policies)")
    parser.add_argument("--out", default="results/passkey.json")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    results = {}
    for name in args.policies:
        def policy_for(length, name=name):
            if name == "full":
                return kvjax.policies.make("full", capacity=length + 8)
            return kvjax.policies.make(name, capacity=max(int(args.capacity * length), 64))
        results[name] = run(model, tokenizer, policy_for, lengths=args.lengths, depths=args.depths, trials=args.trials)
        for r in results[name]:
            print(f"{name:<14} length {r['length']:>5} depth {r['depth']:.1f}: {r['accuracy']:.0%} of {r['trials']}")
    write_json(args.out, dict(model=args.model, capacity_fraction=args.capacity, results=results))
    return results


if __name__ == "__main__":
    main()
