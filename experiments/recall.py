"""Associative recall in bytes: key-value pairs scattered through text, then one key asked back.

The task of the associative-recall benchmarks (H3, arXiv 2212.14052, Sec. 3.1;
Zoology's multi-query recall, arXiv 2312.04927): a pair is two bytes, a key
then its value, written into a text at a random offset. Keys are control bytes
(1-31 but tab, newline and carriage return) that Austen and Shakespeare never
use, so a key is unambiguous; values are lowercase letters. Asking is the key
alone: its answer is the letter that followed it earlier. Nothing marks a pair
as a question except that its key was seen before, so the model must look the
key up in its context, and no cache policy can know in advance which pair will
be asked: memory matters (the setting DMC and POD are meant to survive,
arXiv 2403.09636, Sec. 5; 2412.02252, Sec. 4).

- `RecallMix` feeds training: rows of plain text and rows of text with pairs
  and repeats of earlier pairs (`recall_row`), a function of (seed, step) like
  `kvjax.data.PackedBatches`, so a resumed run sees the same batches.
- `samples` makes the evaluation: contexts of text with `pairs` pairs spread
  through them, one key as the question, its value as the answer.
- `score` is exact match: a greedy answer is right when it starts with the value.

Every draw comes from numpy's Generator seeded explicitly: the same seed gives
the same rows and samples on any machine.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

KEYS = np.array([b for b in range(1, 32) if chr(b) not in "\t\n\r"], np.int32)
VALUES = np.frombuffer(string.ascii_lowercase.encode(), np.uint8).astype(np.int32)
PAIR_BYTES = 2  # key, value
ANSWER_BYTES = 1  # the value


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question: `context` and `question` are byte ids; `answer` is the value the question asks for."""

    context: np.ndarray
    question: np.ndarray
    answer: str
    depth: float  # where the asked pair sits in the context, 0 (start) to 1 (end)


def check_pairs(count: int) -> None:
    if count > len(KEYS):
        raise ValueError(f"{count} pairs need more distinct keys than the {len(KEYS)} there are; ask for fewer pairs")


def draw_pairs(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 2] (key, value) byte pairs with distinct keys."""
    check_pairs(count)
    return np.stack([rng.choice(KEYS, count, replace=False), rng.choice(VALUES, count)], 1)


def splice(filler: np.ndarray, inserts: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """`filler` bytes with each (offset, bytes) inserted before byte `offset` (stable for equal offsets)."""
    out, last = [], 0
    for offset, item in sorted(inserts, key=lambda item: item[0]):
        out += [filler[last:offset], item]
        last = offset
    return np.concatenate(out + [filler[last:]]).astype(np.int32)


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
    at = rng.integers(0, room, pairs)
    inserts = [(int(o), p) for o, p in zip(at, drawn)]
    for which in rng.integers(0, pairs, repeats):
        inserts.append((int(rng.integers(at[which], room + 1)), drawn[which]))
    return splice(text[start : start + room], inserts)  # stable: a repeat at its pair's own offset still follows the pair


@dataclasses.dataclass(frozen=True, eq=False)
class RecallMix:
    """`batches(step)` -> int32 [batch_size, seq_len + 1]: each row plain text (a random window of `text`) or,
    with probability `recall_fraction`, a `recall_row` with `pairs` pairs and `repeats` repeats."""

    text: np.ndarray
    seq_len: int
    batch_size: int
    seed: int = 0
    recall_fraction: float = 0.75
    pairs: int = 28
    repeats: int = 300

    def __post_init__(self):
        filler_room(self.text, self.seq_len + 1, self.pairs + self.repeats)
        check_pairs(self.pairs)

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
    each at uniform random offsets; the asked pair is drawn uniformly among them."""
    rng = np.random.default_rng([seed, length, pairs])
    room = filler_room(text, length - 1, pairs)  # the question is the key: one byte
    out = []
    for _ in range(count):
        drawn = draw_pairs(rng, pairs)
        asked = int(rng.integers(0, pairs))
        start = int(rng.integers(0, len(text) - room))
        at = rng.integers(0, room, pairs)
        context = splice(text[start : start + room], [(int(o), p) for o, p in zip(at, drawn)])
        out.append(Sample(context, drawn[asked, :1].astype(np.int32), chr(drawn[asked, 1]), depth=float(at[asked]) / room))
    return out


def score(prediction: str, answer: str) -> bool:
    """Exact match: the greedy continuation starts with the whole value (what follows it is not judged)."""
    return prediction.startswith(answer)
