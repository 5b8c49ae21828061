"""The recall testbed's task (issue 17): the generator is deterministic and holds what it says, the scorer is exact match."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import recall
from kvjax.data import byte_tokens

TEXT = byte_tokens("It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife. " * 40)


def pairs_in(row) -> list[tuple[int, int, int]]:
    """(offset, key, value) of every key byte in `row` and the byte after it."""
    row = np.asarray(row)
    return [(int(i), int(row[i]), int(row[i + 1])) for i in np.flatnonzero(np.isin(row, recall.KEYS))]


def test_score_is_exact_match_of_the_whole_value():
    assert recall.score("q", "q")
    assert recall.score("q. And", "q")  # what follows the value is not judged
    assert not recall.score("r", "q")
    assert not recall.score("", "q")  # nothing answered
    assert not recall.score(" q", "q")  # the answer must come first
    assert recall.score("abc", "abc") and not recall.score("ab", "abc")


def test_keys_never_occur_in_text_and_values_are_letters():
    assert not np.isin(byte_tokens("Dear Mr. Darcy,\tIt is\r\n"), recall.KEYS).any()  # tab, CR, LF are not keys
    assert len(recall.KEYS) == 28 and set(bytes(recall.VALUES.astype(np.uint8)).decode()) == set("abcdefghijklmnopqrstuvwxyz")


def test_training_batches_are_a_function_of_seed_and_step():
    mix = recall.RecallMix(TEXT, 256, 6, seed=5, pairs=8, repeats=20)
    np.testing.assert_array_equal(mix(7), recall.RecallMix(TEXT, 256, 6, seed=5, pairs=8, repeats=20)(7))
    assert not np.array_equal(mix(7), mix(8))
    assert not np.array_equal(mix(7), recall.RecallMix(TEXT, 256, 6, seed=6, pairs=8, repeats=20)(7))
    assert mix(7).shape == (6, 257) and mix(7).dtype == np.int32


def test_recall_rows_hold_distinct_pairs_and_repeat_them_later():
    row = recall.recall_row(TEXT, 400, np.random.default_rng(0), pairs=6, repeats=5)
    assert len(row) == 400
    items = pairs_in(row)
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
        pairs = {key: chr(value) for _, key, value in pairs_in(s.context)}
        assert len(pairs) == 5 and pairs[int(s.question[0])] == s.answer
        assert 0 <= s.depth <= 1


def test_more_pairs_than_keys_are_refused():
    with pytest.raises(ValueError, match="fewer pairs"):
        recall.draw_pairs(np.random.default_rng(0), len(recall.KEYS) + 1)


def test_rows_the_pairs_or_the_text_cannot_fill_are_refused():
    with pytest.raises(ValueError, match="fewer pairs, longer rows or more text"):
        recall.RecallMix(TEXT, 128, 2)  # 28 pairs + 300 repeats of 2 bytes overflow 129
    with pytest.raises(ValueError, match="more text"):
        recall.samples(TEXT[:50], 300, 1)


def test_every_curriculum_stage_makes_rows_of_equal_bytes_per_step():
    """The testbed's pretraining stages are feasible rows (pairs and repeats fit) and each step trains on
    batch x 1,024 bytes, so stages compare step for step."""
    from experiments.recall_testbed import CURRICULUM, T, stage_rows

    batch = 2
    lengths = []
    for stage in CURRICULUM:
        length, pairs, repeats, _ = stage
        rows = stage_rows(TEXT, stage, batch, seed=0, recall_fraction=1.0)(0)
        assert rows.shape == (batch * T // length, length + 1)  # inputs of `length` bytes and one target byte more
        assert (rows.shape[1] - 1) * rows.shape[0] == batch * T
        assert all(len(pairs_in(row)) == pairs + repeats for row in rows)
        lengths.append(length)
    assert lengths == sorted(lengths) and lengths[-1] == T  # short rows first, the testbed's length last


def test_lookup_accuracy_scores_only_the_bytes_after_keys():
    """An oracle that knows every next byte except after two of the keys scores (keys - 2) / keys, whatever it
    gets wrong elsewhere: only positions whose input is a key count, and target i is row byte i + 1."""
    from experiments.recall_testbed import lookup_accuracy

    rows = recall.RecallMix(TEXT, 128, 3, seed=0, pairs=4, repeats=10, recall_fraction=1.0)(0)
    keys = [tuple(at) for at in np.argwhere(np.isin(rows[:, :-1], recall.KEYS))]  # inputs that are keys
    wrong_keys = keys[:2]

    class Oracle:
        def full_sequence(self, inputs, attention_fn, key):
            truth = np.array(rows[:, 1:])
            for r, i in wrong_keys:
                truth[r, i] = (truth[r, i] + 1) % 256
            truth[~np.isin(rows[:, :-1], recall.KEYS)] = 0  # wrong away from keys: must not count
            return np.eye(256)[truth], None

    assert lookup_accuracy(Oracle(), rows) == pytest.approx((len(keys) - 2) / len(keys))
