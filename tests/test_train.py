"""The training loop, data pipeline and DMC retrofit stages on a tiny model (exact resume, clear errors)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from kvjax import retrofit
from kvjax.data import PackedBatches, byte_tokens, held_out_split, join
from kvjax.train import TrainConfig, train
from models.llama import Llama, LlamaConfig

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 20


def tiny():
    return Llama(LlamaConfig.tiny(head_dim=16), rngs=nnx.Rngs(0))


def test_packed_batches_are_windows_of_the_stream_each_once_per_epoch():
    rng = np.random.default_rng(0)
    tokens = join([rng.integers(1, 256, 500), rng.integers(1, 256, 400)], separator=0)
    assert len(tokens) == 901 and tokens[500] == 0
    batches = PackedBatches(tokens, seq_len=16, batch_size=4, seed=1)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 17)
    starts = []
    for step in range(len(batches) // 4):
        b = batches(step)
        assert b.shape == (4, 17) and b.dtype == np.int32
        starts += [int(np.flatnonzero((windows == row).all(-1))[0]) for row in b]
    assert all(s % 16 == 0 for s in starts) and len(set(starts)) == len(starts)  # aligned windows, none twice in an epoch
    np.testing.assert_array_equal(batches(3), PackedBatches(tokens, seq_len=16, batch_size=4, seed=1)(3))
    assert not np.array_equal(batches(0), PackedBatches(tokens, seq_len=16, batch_size=4, seed=2)(0))
    train_part, held = held_out_split(tokens, 0.1)
    assert len(held) == 91 and np.array_equal(np.concatenate([train_part, held]), tokens)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        PackedBatches(tokens[:40], seq_len=16, batch_size=4)


def test_training_lowers_the_loss():
    model = tiny()
    batches = PackedBatches(byte_tokens(TEXT), seq_len=32, batch_size=4)
    log = train(model, retrofit.language_model_loss(), batches, TrainConfig(steps=40, learning_rate=3e-3), progress=False)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "step"} <= set(log[0])


def test_resume_after_a_crash_follows_the_same_loss_curve(tmp_path):
    """A run that crashes after its step-3 checkpoint and is restarted gives the uninterrupted
    run's losses (data, Gumbel noise and optimiser state all resume); the JSON log has each step once."""
    batches = PackedBatches(byte_tokens(TEXT), seq_len=16, batch_size=2)
    config = TrainConfig(steps=6, checkpoint_every=3, learning_rate=1e-3)
    loss = retrofit.dmc_loss(cr=2.0, ramp_steps=6)
    straight = train(tiny(), loss, batches, config, workdir=tmp_path / "a", progress=False)

    def crashing(step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return batches(step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(), loss, crashing, config, workdir=tmp_path / "b", progress=False)
    resumed = train(tiny(), loss, batches, config, workdir=tmp_path / "b", progress=False)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight[3:]], rtol=1e-6)
    assert all("cr" in r and "target_cr" in r for r in resumed)
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_corrupt_checkpoint_names_the_problem(tmp_path):
    batches = PackedBatches(byte_tokens(TEXT), seq_len=16, batch_size=2)
    train(tiny(), retrofit.language_model_loss(), batches, TrainConfig(steps=2), workdir=tmp_path, progress=False)
    for f in (tmp_path / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        train(tiny(), retrofit.language_model_loss(), batches, TrainConfig(steps=4), workdir=tmp_path, progress=False)


def test_stage_one_zeroes_the_decision_dimension():
    """The zero-out factor reaches 0 at 80% of stage one, after which q/k[d-1] no longer matter."""
    assert float(retrofit.zero_out_factor(0, 10)) == 1.0 and float(retrofit.zero_out_factor(8, 10)) == 0.0
    model = tiny()
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, 256)
    zeroed = model.full_sequence(tokens, retrofit.zero_out_attention(0.0))[0]
    attn = model.layers[0].self_attn
    attn.k_proj.kernel[...] = attn.k_proj.kernel[...].at[:, 15].multiply(100.0)
    np.testing.assert_allclose(model.full_sequence(tokens, retrofit.zero_out_attention(0.0))[0], zeroed, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model.full_sequence(tokens, retrofit.vanilla_attention)[0], zeroed, atol=1e-3)
    assert float(retrofit.target_cr(5, 10, 4.0)) == 2.5
