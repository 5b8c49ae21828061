"""RULER-style long-context tasks (Hsieh et al., arXiv 2404.06654, Sec. 3), generated offline and deterministic by seed.

Every task builds a `Sample` of a target length in the model's own tokens: the
context (instructions and text), the question (with the answer's opening, as
RULER puts it after the assistant turn), and the expected answers. Scoring is
RULER's `string_match_all`: the fraction of expected answers found in the
output, case-insensitive.

- niah_single: one needle ("One of the special magic numbers for {key} is: {value}.")
  at a random depth of Paul Graham's essays; asked for its number.
- niah_multikey: four needles with different keys (three distractors); asked for one.
- niah_multivalue: four numbers under one key; asked for all of them.
- niah_multiquery: four keys; asked for all four numbers.
- variable_tracking: a chain of five assignments (VAR A = 12345, VAR B = VAR A, ...)
  spread through repeated noise sentences; asked for every variable holding the number.
- common_words: a numbered word list where ten words occur 30 times and the others 3;
  asked for the ten most common.
- frequent_words: coded words drawn from a Zipf law (alpha 2); asked for the three most frequent.

Word lists come from text we already have (the essays' vocabulary); random
strings make the coded words. Nothing is fetched at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from collections.abc import Callable

import numpy as np

from experiments.texts import all_essays

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "One of the special magic numbers for {key} is: {value}. "


@dataclasses.dataclass(frozen=True)
class Sample:
    """One task instance in token ids: the context, the question after it, and the answers expected."""

    task: str
    context: list[int]
    question: list[int]
    answers: tuple[str, ...]


class ByteTokenizer:
    """UTF-8 bytes as ids: what the tiny test models read."""

    vocab_size, bos_id, eos_id = 256, None, None

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


def score(prediction: str, answers) -> float:
    """RULER's `string_match_all`: the fraction of `answers` that occur in `prediction` (case-insensitive)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def chat(tokenizer, body: str, question: str, opening: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids): the user turn holds `body` then `question`; the assistant turn opens
    with `opening`. ChatML where the vocabulary has it (SmolLM2-Instruct), plain text otherwise."""
    if has_chatml(tokenizer):
        return (tokenizer.encode("<|im_start|>user\n" + body),
                tokenizer.encode(f"\n{question}<|im_end|>\n<|im_start|>assistant\n{opening}"))
    return tokenizer.encode(body), tokenizer.encode(f"\n{question}\nAnswer: {opening}")


def has_chatml(tokenizer) -> bool:
    return len(tokenizer.encode("<|im_start|>")) == 1


@functools.cache
def essay_text() -> str:
    return all_essays()


@functools.cache
def essay_words() -> tuple[str, ...]:
    """Distinct lowercase words of 4-10 letters from the essays, sorted (the vocabulary keys and lists draw from)."""
    return tuple(sorted({w for w in re.findall(r"[a-z]+", essay_text().lower()) if 4 <= len(w) <= 10}))


def haystack_with(tokenizer, filler: str, inserts: list[str], budget: int, rng) -> str:
    """`filler` cut to about `budget` tokens with each insert at a random sentence boundary."""
    ids = tokenizer.encode(filler)
    room = budget - sum(len(tokenizer.encode(s)) for s in inserts)
    if room < len(inserts) + 1:
        raise ValueError(f"{budget} tokens leave no room for the haystack; use a longer length")
    if len(ids) < room:
        ids = ids * (room // len(ids) + 1)
    start = int(rng.integers(0, len(ids) - room + 1))
    text = tokenizer.decode(ids[start : start + room])
    bounds = [m.end() for m in re.finditer(r"[.!?]\s+", text)] or [len(text)]
    cuts = sorted(int(b) for b in rng.choice(bounds, size=len(inserts), replace=len(bounds) < len(inserts)))
    out, last = [], 0
    for cut, insert in zip(cuts, inserts):
        out += [text[last:cut], insert]
        last = cut
    return "".join(out + [text[last:]])


def magic_number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def niah(kind: str) -> Callable:
    def make(tokenizer, length: int, rng) -> Sample:
        words = essay_words()
        keys = [str(w) for w in rng.choice(words, size=4, replace=False)]
        if kind == "multivalue":
            pairs = [(keys[0], magic_number(rng)) for _ in range(4)]
        elif kind == "single":
            pairs = [(keys[0], magic_number(rng))]
        else:
            pairs = [(k, magic_number(rng)) for k in keys]
        if kind in ("single", "multikey"):
            asked, answers = keys[0], (pairs[0][1],)
        else:
            asked, answers = (", ".join(keys) if kind == "multiquery" else keys[0]), tuple(v for _, v in pairs)
        plural = kind != "single" and kind != "multikey"
        question = (f"What {'are all the special magic numbers' if plural else 'is the special magic number'} for {asked} "
                    "mentioned in the provided text?")
        opening = f"The special magic number{'s' if plural else ''} for {asked} mentioned in the provided text {'are' if plural else 'is'}"
        intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                 "I will quiz you about the numbers afterwards.\n")
        return fit(tokenizer, f"niah_{kind}", length, rng, intro, [NEEDLE.format(key=k, value=v) for k, v in pairs],
                   essay_text(), question, opening, answers)
    return make


def fit(tokenizer, task, length, rng, intro, inserts, filler, question, opening, answers) -> Sample:
    """A Sample of `length` tokens: the intro, then `filler` around the inserts, then the question."""
    _, q_ids = chat(tokenizer, "", question, opening)
    head, _ = chat(tokenizer, intro, question, opening)
    body = haystack_with(tokenizer, filler, inserts, length - len(q_ids) - len(head), rng)
    ctx, q_ids = chat(tokenizer, intro + body, question, opening)
    return Sample(task, ctx, q_ids, tuple(answers))


def variable_tracking(tokenizer, length: int, rng) -> Sample:
    value = str(int(rng.integers(10_000, 100_000)))
    names = ["".join(rng.choice(list(string.ascii_uppercase), size=5)) for _ in range(5)]
    chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = f"Find all variables that are assigned the value {value} in the text above."
    opening = f"According to the chain(s) of variable assignment in the text above, {len(names)} variables are assigned the value {value}, they are:"
    return fit(tokenizer, "variable_tracking", length, rng, intro, chain, NOISE * 4, question, opening, names)


def word_list_sample(tokenizer, task, length, rng, intro, question, opening, counts: Callable[[int], list[tuple[str, int]]], answers):
    """A shuffled numbered list of words sized to `length` tokens: `counts(n)` gives (word, repeats) for n distinct words."""
    shuffle = int(rng.integers(2**31))  # one order per sample, whatever sizes are tried

    def listing(n):
        words = [w for w, c in counts(n) for _ in range(c)]
        order = np.random.default_rng(shuffle).permutation(len(words))
        return intro + " ".join(f"{i + 1}. {words[j]}" for i, j in enumerate(order))

    def fits(n):
        return sum(map(len, chat(tokenizer, listing(n), question, opening))) <= length

    if not fits(1):
        raise ValueError(f"{task}: {length} tokens cannot hold the list's repeated words; use a longer length")
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the most distinct words that still fit
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    ctx, q_ids = chat(tokenizer, listing(lo), question, opening)
    return Sample(task, ctx, q_ids, tuple(answers))


def common_words(tokenizer, length: int, rng) -> Sample:
    """RULER's counts (ten words 30 times, the rest 3) where the length allows; a shorter list repeats the ten
    fewer times (at least 4), so that they fill about half of it."""
    pool = [str(w) for w in rng.permutation(essay_words())]
    entry = len(tokenizer.encode(f" 100. {pool[0]}"))
    common, reps = pool[:10], min(30, max(4, length // (20 * entry)))

    def counts(n):
        if 10 + n > len(pool):
            raise ValueError(f"common_words: {length} tokens want more than the {len(pool)} words the essays have")
        return [(w, reps) for w in common] + [(w, 3) for w in pool[10 : 10 + n]]

    return word_list_sample(
        tokenizer, "common_words", length, rng, "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n", "What are the 10 most common words in the above list?",
        "The top 10 words that appear most often in the list are:", counts, common)


def frequent_words(tokenizer, length: int, rng) -> Sample:
    coded = ["".join(rng.choice(list(string.ascii_lowercase), size=5)) for _ in range(length + 3)]  # n + 3 <= length + 3

    def counts(n):
        weights = 1.0 / np.arange(1, n + 4) ** 2.0  # Zipf, alpha 2: the top three stand clear
        total = max(3 * (n + 3), 60)
        return [(w, max(1, int(round(total * p / weights.sum())))) for w, p in zip(coded, weights)]

    return word_list_sample(
        tokenizer, "frequent_words", length, rng, "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words.\n", "What are the three most frequently appeared words in the above coded text?",
        "The three most frequently appeared words are:", counts, coded[:3])


TASKS: dict[str, Callable] = {
    "niah_single": niah("single"), "niah_multikey": niah("multikey"), "niah_multivalue": niah("multivalue"),
    "niah_multiquery": niah("multiquery"), "variable_tracking": variable_tracking,
    "common_words": common_words, "frequent_words": frequent_words,
}


def samples(task: str, tokenizer, length: int, count: int, seed: int = 0) -> list[Sample]:
    """`count` samples of `task` at about `length` tokens; the same seed gives the same samples."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, list(TASKS).index(task)])
    return [TASKS[task](tokenizer, length, rng) for _ in range(count)]
