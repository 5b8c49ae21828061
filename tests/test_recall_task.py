"""The recall testbed's task (issue 17): the generator is deterministic and holds what it says, the scorer is exact match."""

from __future__ import annotations

import re

import numpy as np
import pytest

from experiments import recall
from kvjax.data import byte_tokens

TEXT = byte_tokens("It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife. " * 40)
PAIR = re.compile(rb"<([A-Z]{3})=(\d{4})>")


def as_bytes(ids) -> bytes:
    return bytes(np.asarray(ids, np.uint8))


def test_score_is_exact_match_of_the_whole_value():
    assert recall.score("1234", "1234")
    assert recall.score("1234>", "1234")  # what follows the value is not judged
    assert not recall.score("1243", "1234")
    assert not recall.score("123", "1234")  # too short
    assert not recall.score(" 1234", "1234")  # the answer must come first


def test_training_batches_are_a_function_of_seed_and_step():
    mix = recall.RecallMix(TEXT, 256, 6, seed=5, pairs=8, repeats=6)
    np.testing.assert_array_equal(mix(7), recall.RecallMix(TEXT, 256, 6, seed=5, pairs=8, repeats=6)(7))
    assert not np.array_equal(mix(7), mix(8))
    assert not np.array_equal(mix(7), recall.RecallMix(TEXT, 256, 6, seed=6, pairs=8, repeats=6)(7))
    assert mix(7).shape == (6, 257) and mix(7).dtype == np.int32


def test_recall_rows_hold_distinct_pairs_and_repeat_them_later():
    rng = np.random.default_rng(0)
    row = as_bytes(recall.recall_row(TEXT, 400, rng, pairs=6, repeats=5))
    assert len(row) == 400
    items = [(m.start(), m.group(1), m.group(2)) for m in PAIR.finditer(row)]
    assert len(items) == 11
    first = {}
    for at, key, value in items:
        if key in first:  # a repeat: same value, after its pair
            assert first[key][1] == value and first[key][0] < at
        else:
            first[key] = (at, value)
    assert len(first) == 6


def test_eval_samples_are_deterministic_and_ask_a_pair_of_their_context():
    a = recall.samples(TEXT, 300, 4, pairs=5, seed=2)
    b = recall.samples(TEXT, 300, 4, pairs=5, seed=2)
    assert all(np.array_equal(x.context, y.context) and x.answer == y.answer for x, y in zip(a, b))
    assert [s.answer for s in a] != [s.answer for s in recall.samples(TEXT, 300, 4, pairs=5, seed=3)]
    for s in a:
        assert len(s.context) + len(s.question) == 300
        key = re.fullmatch(rb"<([A-Z]{3})=", as_bytes(s.question)).group(1)
        pairs = dict((k, v.decode()) for k, v in PAIR.findall(as_bytes(s.context)))
        assert len(pairs) == 5 and pairs[key] == s.answer
        assert 0 <= s.depth <= 1


def test_rows_the_pairs_or_the_text_cannot_fill_are_refused():
    with pytest.raises(ValueError, match="fewer pairs, longer rows or more text"):
        recall.RecallMix(TEXT, 256, 2)  # 16 pairs + 12 repeats of 10 bytes overflow 257
    with pytest.raises(ValueError, match="more text"):
        recall.samples(TEXT[:50], 300, 1)
