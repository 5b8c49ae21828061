"""The long-context suite: RULER-style task generation and scoring, the two answer protocols, the resumable runners
(leaderboard, long-text perplexity)."""

from __future__ import annotations

import collections
import json
import re
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import kvjax
from experiments import leaderboard, long_perplexity, quantized_budget, ruler
from kvjax.evaluate import answer
from kvjax.plan import BudgetTooSmall
from models import Llama, LlamaConfig

BYTES = ruler.ByteTokenizer()


def test_score_is_rulers_string_match_all():
    assert ruler.score("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert ruler.score("Only 123 here", ["123", "456"]) == 0.5
    assert ruler.score("nothing", ["123"]) == 0.0
    assert ruler.score("They are: APPLE, pear", ["apple", "Pear", "plum"]) == pytest.approx(2 / 3)  # case-insensitive


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_tasks_are_deterministic_sized_and_hold_their_answers(task):
    length = 1500
    a, b = ruler.samples(task, BYTES, length, 2, seed=3), ruler.samples(task, BYTES, length, 2, seed=3)
    assert a == b
    assert a != ruler.samples(task, BYTES, length, 2, seed=4)
    for s in a:
        assert 0.8 * length <= len(s.context) + len(s.question) <= length, len(s.context) + len(s.question)
        context = BYTES.decode(s.context)
        if task.startswith("niah"):
            for value in s.answers:
                assert re.search(rf"special magic numbers for \w+ is: {value}\.", context)
            assert len(re.findall(r"special magic numbers for", context)) == (1 if task == "niah_single" else 4)
        elif task == "variable_tracking":
            value = re.search(r"assigned the value (\d+)", BYTES.decode(s.question)).group(1)
            assert f"VAR {s.answers[0]} = {value}." in context
            for a_, b_ in zip(s.answers, s.answers[1:]):
                assert f"VAR {b_} = VAR {a_}." in context
        else:  # the expected words are exactly the most frequent ones of the list
            counts = collections.Counter(re.findall(r"\d+\. (\w+)", context))
            top = sorted(counts, key=counts.get, reverse=True)[: len(s.answers)]
            assert set(top) == set(s.answers) and min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)


def test_a_length_too_short_for_the_task_is_named():
    with pytest.raises(ValueError, match="common_words: 300 tokens cannot hold"):
        ruler.samples("common_words", BYTES, 300, 1)


@pytest.fixture(scope="module")
def tiny():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


CONTEXT = np.asarray(jax.random.randint(jax.random.key(5), (2, 40), 1, 256))
QUESTION = np.asarray(jax.random.randint(jax.random.key(6), (2, 6), 1, 256))


def test_both_protocols_agree_with_the_full_cache(tiny):
    full = kvjax.policies.make("full", capacity=60)
    a = answer(tiny, CONTEXT, QUESTION, policy=full, protocol="kvpress", max_new_tokens=6)
    b = answer(tiny, CONTEXT, QUESTION, policy=full, protocol="streaming", max_new_tokens=6, chunk_size=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streaming_llm", "kvmerger"])
def test_kvpress_protocol_is_the_full_cache_with_the_evicted_context_masked(tiny, name):
    """Compress once, then append: the same greedy tokens as a full cache of the context in which every slot the
    compressed cache dropped is masked, the question and the answer then appended to it."""
    policy = kvjax.policies.make(name, capacity=16, **{"snapkv": dict(window=4)}.get(name, {}))
    got = answer(tiny, CONTEXT, QUESTION, policy=policy, protocol="kvpress", max_new_tokens=6)
    assert got.cache.slots == (16 + 6 + 6,) * 2

    valid, key = np.ones(CONTEXT.shape, bool), jax.random.key(0)
    _, small = kvjax.prefill(tiny, CONTEXT, valid, tiny.cache_spec().init(policy, 2), key, chunk_size=40)
    _, full = kvjax.prefill(tiny, CONTEXT, valid, tiny.cache_spec().init(kvjax.policies.make("full", capacity=52), 2), key, chunk_size=40)
    layers = []
    for s, f in zip(small.layers, full.layers):
        kept = np.asarray(s.pos)[..., None, :] == np.asarray(f.pos)[..., :, None]  # [B, H, full slot, small slot]
        layers.append(f.replace(valid=f.valid & (kept & np.asarray(s.valid)[..., None, :]).any(-1)))
    masked = full.replace(layers=tuple(layers))
    if name != "kvmerger":  # merging rewrites slot contents; eviction keeps them as they were
        assert all(int(m.valid.sum()) == int(s.valid.sum()) for m, s in zip(masked.layers, small.layers))
        want = kvjax.generate(tiny, QUESTION, cache=masked, max_new_tokens=6)
        np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("name", ["dmc", "pod"])
def test_policies_with_capacity_sized_state_say_to_stream(tiny, name):
    policy = kvjax.policies.make(name, capacity=16, **{"pod": dict(sinks=2, window=4)}.get(name, {}))
    with warnings.catch_warnings(), pytest.raises(ValueError, match=f"{name}.*cannot grow; run it under the streaming protocol"):
        warnings.simplefilter("ignore", UserWarning)  # DMC on a model never retrofitted
        answer(tiny, CONTEXT, QUESTION, policy=policy, protocol="kvpress", max_new_tokens=4)


def test_leaderboard_runs_resumes_and_plots(tmp_path, monkeypatch):
    out = tmp_path / "board.jsonl"
    argv = ["--model", "tiny", "--context", "600", "--samples", "2", "--tasks", "variable_tracking",
            "--policies", "h2o", "--budgets", "0.25", "--new-tokens", "4", "--min-ceiling", "0", "--out", str(out)]
    rows = leaderboard.main(argv)
    assert {(r["task"], r["policy"], r["protocol"]) for r in rows} == {
        ("variable_tracking", p, pr) for p in ("full", "h2o") for pr in ("kvpress", "streaming")}
    assert all(0 <= r["score"] <= 1 and r["samples"] == 2 for r in rows)
    assert {r["capacity"] for r in rows if r["policy"] == "h2o"} == {150}
    assert "| h2o | 0.25 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(leaderboard, "run_cell", must_not_run)
    assert len(leaderboard.main(argv)) == len(rows)  # resumed: every cell read back from the file
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(rows)


def test_leaderboard_runs_policies_in_slot_formats_at_equal_bytes(tmp_path):
    """`--kv-dtypes none int8`: every policy and the ceiling once per format, labelled "h2o@int8";
    at one byte budget the int8 slots are more (and the kernels read them as stored)."""
    out = tmp_path / "board.jsonl"
    rows = leaderboard.main(["--model", "tiny", "--context", "600", "--samples", "2", "--tasks", "niah_single", "--protocols", "kvpress",
                             "--policies", "h2o", "--budgets", "64KiB", "--kv-dtypes", "none", "int8", "--new-tokens", "4",
                             "--min-ceiling", "0", "--out", str(out)])
    capacity = {r["policy"]: r["capacity"] for r in rows}
    assert set(capacity) == {"full", "full@int8", "h2o", "h2o@int8"}
    assert capacity["h2o@int8"] > 2 * capacity["h2o"]  # head_dim 16: 2 x (16 + 4) bytes a slot against 2 x 64
    assert "| h2o@int8 | 64KiB |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_a_byte_budget_gives_every_policy_the_same_bytes_per_row(tiny):
    """'64KiB' is per sample: each policy's cache holds at most that per row, whatever the batch."""
    for name in ["h2o", "snapkv", "streaming_llm", "h2o@int8", "snapkv@fp8", "h2o@int4"]:
        policy = leaderboard.policy_for(tiny, name, "64KiB", context=600, extra=10)
        for batch in (1, 3):
            nbytes = jax.eval_shape(lambda: tiny.cache_spec().init(policy, batch)).nbytes
            assert 0.9 * 64 * 2**10 * batch <= nbytes <= 64 * 2**10 * batch, (name, batch, nbytes)


def test_kivi_cells_get_whole_groups_of_slots(tiny):
    """KIVI's formats store slots in groups of 32: a fraction budget rounds down to whole groups, the
    full cache up (it must hold the whole sample)."""
    assert leaderboard.policy_for(tiny, "h2o@int4", "0.25", context=600, extra=10).capacity == 128  # 150 -> 128
    assert leaderboard.policy_for(tiny, "full@int2", "1.0", context=600, extra=10).capacity == 640  # 610 -> 640
    assert leaderboard.policy_for(tiny, "h2o@int8", "0.25", context=600, extra=10).capacity == 150
    with pytest.raises(BudgetTooSmall, match="the minimum budget is"):  # the leaderboard reports such a cell as not fitting
        leaderboard.policy_for(tiny, "h2o@int4", "16KiB", context=600, extra=10)  # the exact residual alone is 16 KiB


def test_long_perplexity_runs_resumes_and_a_budget_of_the_whole_text_is_the_full_cache(tmp_path, monkeypatch):
    out = tmp_path / "ppl.jsonl"
    argv = ["--model", "tiny", "--lengths", "256", "--texts", "essays", "--policies", "h2o", "--budgets", "0.25", "1.0",
            "--out", str(out)]
    rows = {(r["policy"], r["budget"]): r for r in long_perplexity.main(argv)}
    assert set(rows) == {("full", "1.0"), ("h2o", "0.25"), ("h2o", "1.0")} and rows[("h2o", "0.25")]["capacity"] == 64
    assert rows[("h2o", "1.0")]["perplexity"] == pytest.approx(rows[("full", "1.0")]["perplexity"], rel=1e-5)  # nothing evicted
    assert rows[("h2o", "0.25")]["perplexity"] != pytest.approx(rows[("full", "1.0")]["perplexity"], rel=1e-3)
    assert "| h2o | 0.25 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    monkeypatch.setattr(long_perplexity, "perplexity", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    assert len(long_perplexity.main(argv)) == 3


def test_quantized_budget_buys_more_slots_in_a_narrower_format_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "quant.jsonl"
    argv = ["--model", "tiny", "--length", "256", "--policies", "h2o", "--kv-dtypes", "float32", "int8", "--budgets", "0.25",
            "--chunk", "32", "--out", str(out)]
    rows = {(r["policy"], r["kv_dtype"]): r for r in quantized_budget.main(argv)}
    assert set(rows) == {("full", "float32"), ("full", "int8"), ("h2o", "float32"), ("h2o", "int8")}
    for key in (("h2o", "float32"), ("h2o", "int8")):
        assert 0.9 * 0.25 <= rows[key]["bytes_fraction"] <= 0.25  # the budget is filled, never exceeded
    assert rows[("h2o", "int8")]["capacity"] > 2.5 * rows[("h2o", "float32")]["capacity"]  # head_dim 16: (128 + 9) / (40 + 9)
    assert rows[("full", "float32")]["bytes_fraction"] == 1.0
    assert rows[("full", "int8")]["bytes_fraction"] == pytest.approx((2 * (16 + 4) + 9) / (2 * 16 * 4 + 9), rel=1e-3)
    assert "| h2o | int8 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    monkeypatch.setattr(quantized_budget, "perplexity", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    assert len(quantized_budget.main(argv)) == 4
