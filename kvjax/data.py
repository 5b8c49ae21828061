"""Training data: fixed-length windows packed from a token stream, the same batch for the same step.

Documents are joined (with a separator token) into one stream and cut into
windows of `seq_len + 1` tokens (inputs and their next-token targets), no
padding. Batch `step` is a function of (seed, step) only, so a run resumed
from a checkpoint at step n sees exactly the batches an uninterrupted run
would have seen after n.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def byte_tokens(text: str) -> np.ndarray:
    """UTF-8 bytes as token ids (a 256-token vocabulary for small models trained from scratch)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def join(documents: Sequence[np.ndarray], separator: int | None = None) -> np.ndarray:
    """One token stream: the documents in order, `separator` between them if given."""
    parts = []
    for doc in documents:
        parts.append(np.asarray(doc, np.int32))
        if separator is not None:
            parts.append(np.asarray([separator], np.int32))
    return np.concatenate(parts[:-1] if separator is not None else parts)


def held_out_split(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): the last `fraction` of the stream is held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must lie in (0, 1), got {fraction}")
    cut = int(len(tokens) * (1 - fraction))
    return tokens[:cut], tokens[cut:]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedBatches:
    """`batches(step)` -> int32 [batch_size, seq_len + 1]: windows in a fresh random order each epoch."""

    tokens: np.ndarray
    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if len(self) < self.batch_size:
            raise ValueError(
                f"{len(self.tokens)} tokens make {len(self)} windows of seq_len + 1 = {self.seq_len + 1}, "
                f"fewer than batch_size={self.batch_size}; use more text or shorter sequences"
            )

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __call__(self, step: int) -> np.ndarray:
        n = len(self)
        index = step * self.batch_size + np.arange(self.batch_size)
        epoch, within = np.divmod(index, n)
        orders = {e: np.random.default_rng([self.seed, int(e)]).permutation(n) for e in np.unique(epoch)}
        starts = np.array([orders[e][w] for e, w in zip(epoch, within)]) * self.seq_len
        return np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int32)
