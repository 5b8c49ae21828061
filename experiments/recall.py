"""A synthetic long-range recall task in bytes: key-value pairs scattered through text, then one key asked back.

A pair is written `<KEY=1234>` (three capital letters, four digits) into a
text at a random byte offset. Asking is the same item cut after `=`: `<KEY=`, whose answer
is the four digits that followed that key earlier. Nothing marks a pair as a
question except that its key was seen before, so the model must look the key
up in its context: a byte-level induction task whose answer may lie anywhere in
the cache (the associative-recall setting DMC and its peers are meant for,
arXiv 2403.09636, Sec. 5; memory matters because no policy can know in advance
which of the pairs will be asked).

- `RecallMix` feeds training: rows of plain text and rows of text with pairs
  and repeats of earlier pairs (`recall_row`), a function of (seed, step) like
  `kvjax.data.PackedBatches`, so a resumed run sees the same batches.
- `samples` makes the evaluation: contexts of text with `pairs` pairs spread
  through them, the question `<KEY=` of one of them, and its answer.
- `score` is exact match: a greedy answer is right when it starts with the value.

Every draw comes from numpy's Generator seeded explicitly: the same seed gives
the same rows and samples on any machine.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from kvjax.data import byte_tokens

KEY_LETTERS, VALUE_DIGITS = 3, 4


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question: `context` and `question` are byte ids; `answer` is the value the question asks for."""

    context: np.ndarray
    question: np.ndarray
    answer: str
    depth: float  # where the asked pair sits in the context, 0 (start) to 1 (end)


def pair_text(key: str, value: str) -> str:
    return f"<{key}={value}>"


def draw_pairs(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """`count` pairs with distinct keys."""
    alphabet = np.array(list(string.ascii_uppercase))
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choice(alphabet, KEY_LETTERS))
        if key not in keys:
            keys.append(key)
    return [(key, "".join(map(str, rng.integers(0, 10, VALUE_DIGITS)))) for key in keys]


def splice(filler: np.ndarray, inserts: list[tuple[int, str]]) -> np.ndarray:
    """`filler` bytes with each (offset, text) inserted before byte `offset` (stable for equal offsets)."""
    out, last = [], 0
    for offset, text in sorted(inserts, key=lambda item: item[0]):
        out += [filler[last:offset], byte_tokens(text)]
        last = offset
    return np.concatenate(out + [filler[last:]]).astype(np.int32)


PAIR_BYTES = len(pair_text("K" * KEY_LETTERS, "0" * VALUE_DIGITS))


def filler_room(text: np.ndarray, length: int, items: int) -> int:
    """Bytes of `text` a row of `length` with `items` pairs holds; refuses rows the pairs or the text cannot fill."""
    room = length - items * PAIR_BYTES
    if room < 1 or len(text) <= room:
        raise ValueError(f"a {length}-byte row with {items} pairs of {PAIR_BYTES} bytes needs more than "
                         f"{max(room, 0)} bytes of text around them and a text longer than that (got {len(text)}); "
                         "use fewer pairs, longer rows or more text")
    return room


def recall_row(text: np.ndarray, length: int, rng: np.random.Generator, pairs: int, repeats: int) -> np.ndarray:
    """`length` bytes of a random stretch of `text` with `pairs` pairs at random places and `repeats`
    repeats of earlier pairs, each somewhere after the pair it repeats (training rows)."""
    room = filler_room(text, length, pairs + repeats)
    drawn = draw_pairs(rng, pairs)
    start = int(rng.integers(0, len(text) - room))
    filler = text[start : start + room]
    at = rng.integers(0, room, pairs)
    inserts = [(int(o), pair_text(*p)) for o, p in zip(at, drawn)]
    for which in rng.integers(0, pairs, repeats):
        inserts.append((int(rng.integers(at[which], room + 1)), pair_text(*drawn[which])))
    return splice(filler, inserts)  # stable: a repeat at its pair's own offset still follows the pair


@dataclasses.dataclass(frozen=True, eq=False)
class RecallMix:
    """`batches(step)` -> int32 [batch_size, seq_len + 1]: each row plain text (a random window of `text`) or,
    with probability `recall_fraction`, a `recall_row` with `pairs` pairs and `repeats` repeats."""

    text: np.ndarray
    seq_len: int
    batch_size: int
    seed: int = 0
    recall_fraction: float = 0.5
    pairs: int = 16
    repeats: int = 12

    def __post_init__(self):
        filler_room(self.text, self.seq_len + 1, self.pairs + self.repeats)

    def __call__(self, step: int) -> np.ndarray:
        rows = []
        for row in range(self.batch_size):
            rng = np.random.default_rng([self.seed, step, row])
            if rng.random() < self.recall_fraction:
                rows.append(recall_row(self.text, self.seq_len + 1, rng, self.pairs, self.repeats))
            else:
                start = int(rng.integers(0, len(self.text) - self.seq_len - 1))
                rows.append(self.text[start : start + self.seq_len + 1])
        return np.stack(rows).astype(np.int32)


def samples(text: np.ndarray, length: int, count: int, *, pairs: int = 16, seed: int = 0) -> list[Sample]:
    """`count` questions over contexts of `length` bytes of `text` (question included), `pairs` pairs
    each, spread evenly in expectation; the asked pair is drawn uniformly among them."""
    rng = np.random.default_rng([seed, length, pairs])
    out = []
    for _ in range(count):
        drawn = draw_pairs(rng, pairs)
        key, value = drawn[int(rng.integers(0, pairs))]
        question = byte_tokens(f"<{key}=")
        room = filler_room(text, length - len(question), pairs)
        start = int(rng.integers(0, len(text) - room))
        filler = text[start : start + room]
        at = sorted(int(o) for o in rng.integers(0, room, pairs))
        inserts = list(zip(at, (pair_text(*p) for p in drawn)))
        context = splice(filler, inserts)
        asked = next(o for o, p in zip(at, drawn) if p[0] == key)
        out.append(Sample(context, question, value, depth=asked / room))
    return out


def score(prediction: str, answer: str) -> bool:
    """Exact match: the greedy continuation starts with the whole value (what follows it is not judged)."""
    return prediction.startswith(answer)
