"""SPMD over a (data, model) mesh of 8 simulated CPU devices (conftest sets XLA_FLAGS before jax loads).

Correctness and memory only: simulated devices share one CPU, so nothing here says anything about speed.
"""

from __future__ import annotations

import functools
import pathlib
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from experiments.texts import essay
from kvjax import retrofit, sharding
from kvjax.data import PackedBatches, byte_tokens
from kvjax.run import forward_chunk
from kvjax.train import TrainConfig, train
from models import Llama, LlamaConfig
from tests.helpers import first_layers

CFG = LlamaConfig.tiny(num_heads=8, num_kv_heads=4, num_layers=1)  # heads that divide over model axes of 1, 2 and 4
OPTIONS = {"snapkv": dict(window=4), "pod": dict(sinks=2, window=4)}
POLICIES = ["full", "h2o", "snapkv", "streaming_llm", "pod", "dmc", "kvmerger"]
PROMPT = np.asarray(jax.random.randint(jax.random.key(1), (8, 24), 1, 256))


def policy(name: str, capacity: int = 16):
    return kvjax.policies.make(name, capacity=40 if name == "full" else capacity, **OPTIONS.get(name, {}))


def model(mesh=None) -> Llama:
    m = Llama(CFG, rngs=nnx.Rngs(0))
    return m if mesh is None else sharding.shard_model(m, mesh)


def greedy(m, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DMC on a model never retrofitted
        return kvjax.generate(m, PROMPT, policy=policy(name), max_new_tokens=8, chunk_size=8)


_SINGLE: dict[str, np.ndarray] = {}


def single_device_tokens(name):
    if name not in _SINGLE:
        _SINGLE[name] = np.asarray(greedy(model(), name).tokens)
    return _SINGLE[name]


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)])
@pytest.mark.parametrize("name", POLICIES)
def test_sharded_generate_equals_one_device(name, shape):
    """Batch rows over data, heads over model, on every mesh whose `model` axis divides the 4 KV heads:
    the single-device greedy tokens, the cache still sharded."""
    out = greedy(model(sharding.make_mesh(*shape)), name)
    np.testing.assert_array_equal(out.tokens, single_device_tokens(name))
    for leaf in jax.tree.leaves(out.cache):  # every buffer is [batch, kv_heads, ...] (`seen`: [batch])
        want = (leaf.shape[0] // shape[0],) + ((leaf.shape[1] // shape[1],) if leaf.ndim > 1 else ()) + leaf.shape[2:]
        assert leaf.sharding.shard_shape(leaf.shape) == want, leaf.sharding


def test_kv_heads_the_model_axis_does_not_divide_are_replicated():
    """1 x 8 (h2o): 4 KV heads do not divide over 8 devices, so they are replicated over `model`
    (the documented choice, with a warning that names it) while the 8 query heads are sharded;
    the tokens are still the single device's."""
    want = single_device_tokens("h2o")
    with pytest.warns(UserWarning, match="4 kv_heads do not divide over the 8 devices of mesh axis 'model'; they are replicated"):
        m = model(sharding.make_mesh(1, 8))
    assert m.layers[0].self_attn.q_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert m.layers[0].self_attn.k_proj.kernel[...].sharding.is_fully_replicated
    with pytest.warns(UserWarning, match="replicated"):  # the cache's KV heads too
        out = kvjax.generate(m, PROMPT, policy=policy("h2o"), max_new_tokens=8, chunk_size=8)
    np.testing.assert_array_equal(out.tokens, want)
    assert out.cache.layers[0].k.sharding.is_fully_replicated and len(out.cache.layers[0].k.sharding.device_set) == 8


def test_cache_bytes_per_device_are_total_over_shards():
    """[batch, kv_heads, ...] buffers hold 1/8 of their bytes per device on 2 x 4; `seen` [batch] 1/2."""
    mesh = sharding.make_mesh(2, 4)
    cache = sharding.shard_cache(model().cache_spec().init(policy("h2o", 64), 8), mesh)
    held = sharding.bytes_per_device(cache)
    seen = cache.seen.nbytes  # [batch]: over data only, replicated over model
    assert len(held) == 8 and set(held.values()) == {(cache.nbytes - seen) // 8 + seen // 2}


def decode_step_hlo(name: str) -> str:
    """The compiled (partitioned) decode step of the tiny model on 2 x 4, 4 rows, a cache of 96 slots."""
    mesh = sharding.make_mesh(2, 4)
    m = model(mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cache = sharding.shard_cache(m.cache_spec().init(policy(name, 96), 4), mesh)
    graphdef, state = nnx.split(m)
    token = jax.device_put(jnp.ones((4, 1), jnp.int32), sharding.batch_spec(mesh, 4))
    step = jax.jit(lambda st, c, t: forward_chunk(nnx.merge(graphdef, st), t, t > 0, c, jax.random.key(0), prefill=False),
                   donate_argnums=1)
    return step.lower(state, cache, token).compile().as_text()


@pytest.mark.parametrize("name", ["h2o", "snapkv", "streaming_llm", "kvmerger", "dmc", "tova"])
def test_compiled_decode_step_gathers_no_cache_buffer(name):
    """Policies stay local: in the partitioned decode step no all-gather returns a buffer with the slot
    axis (96 slots, a size no other array has), so every (row, KV head) shard is updated where it lives."""
    hlo = decode_step_hlo(name)
    gathered = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", hlo)
    assert "all-reduce" in hlo  # the program is partitioned (o_proj's heads are summed across `model`)
    assert not [g for g in gathered if "96" in g.split(",")], gathered


def test_tova_shares_one_score_row_across_model():
    """TOVA's score averages every query head of the layer, a reduction over the KV heads that `model`
    splits: its only communication with the candidate axis (96 slots + 1 token) is one all-reduce of
    [local rows, 97] floats, never a gathered mass or cache buffer."""
    hlo = decode_step_hlo("tova")
    moved = [(op, dims) for shapes, op in re.findall(r"= (.*?) (all-reduce|all-gather)\(", hlo)
             for dims in re.findall(r"\[([\d,]*)\]", shapes) if {"96", "97"} & set(dims.split(","))]
    assert moved == [("all-reduce", "2,97")], moved


def test_a_mesh_larger_than_the_devices_names_the_flag():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        sharding.make_mesh(16, 1)


def test_sharded_perplexity_equals_one_device():
    """evaluate places the cache and the text on the model's mesh like generate does."""
    want = kvjax.evaluate.perplexity(model(), PROMPT, policy=policy("h2o"), chunk_size=8)
    got = kvjax.evaluate.perplexity(model(sharding.make_mesh(4, 2)), PROMPT, policy=policy("h2o"), chunk_size=8)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pallas_attention_runs_once_per_shard():
    """Under the model's mesh the Pallas kernels run inside `shard_map` on [batch/2, kv_heads/4] blocks
    (XLA cannot split a kernel call) and give the single-device reference's output and mass."""
    keys = iter(jax.random.split(jax.random.key(3), 8))
    b, s, c, h, g, d = 4, 3, 16, 4, 2, 16
    args = [jax.random.normal(next(keys), shape) for shape in [(b, s, h * g, d), (b, h, c, d), (b, h, c, d)]]
    args.append(jax.random.bernoulli(next(keys), 0.7, (b, h, c)))
    args += [jax.random.normal(next(keys), (b, s, h, d)) for _ in range(2)]
    args.append(jnp.ones((b, s), bool))
    weights = jax.random.uniform(next(keys), (b, s))
    run = lambda impl: lambda *a: kvjax.attention(*a, scale=0.25, stat_weights=weights, impl=impl)  # noqa: E731
    want = run("xla")(*args)
    mesh = sharding.make_mesh(2, 4)
    placed = [jax.device_put(x, jax.sharding.NamedSharding(mesh, sharding.spec_for(mesh, ("batch",), x.shape))) for x in args]
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(run("pallas"))(*placed))
        got = jax.jit(run("pallas"))(*placed)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["h2o", "dmc"])
def test_sharded_pallas_generate_equals_one_device(name, monkeypatch):
    """generate with impl="pallas" on 2 x 4: every kernel call sees one shard's block (4 of the 8 rows,
    1 of the 4 KV heads), and the tokens are the single-device XLA tokens."""
    module, blocks = sys.modules["kvjax.attention"], set()

    def recording(q, *args, **kwargs):
        blocks.add(q.shape[:2])
        return kernel(q, *args, **kwargs)

    kernel = module.cache_attention
    monkeypatch.setattr(module, "cache_attention", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = kvjax.generate(model(sharding.make_mesh(2, 4)), PROMPT, policy=policy(name), max_new_tokens=8, chunk_size=8,
                             impl="pallas")
    assert blocks == {(4, 1)}
    np.testing.assert_array_equal(out.tokens, single_device_tokens(name))


def test_sharded_calibration_keeps_the_cache_on_the_mesh():
    """calibrate prefills on the model's mesh: the profile equals one device's and the cache stays sharded."""
    mesh = sharding.make_mesh(2, 4)
    want = kvjax.calibrate.merge_profile(model(), PROMPT, chunk_size=8)
    assert kvjax.calibrate.merge_profile(model(mesh), PROMPT, chunk_size=8) == want
    cache = kvjax.calibrate._prefilled(model(mesh), jnp.asarray(PROMPT), lambda n: kvjax.policies.make("full", capacity=n), 8, "auto")
    assert tuple(cache.layers[0].k.sharding.spec)[:2] == ("data", "model")


HF_LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama"  # 4 query heads, 2 KV heads, vocab 128


def test_load_places_each_weight_sharded_as_the_rules_say(tmp_path):
    """models.load(mesh=) on 4 x 2: each weight arrives with its rule's sharding (each device holds only
    its shard), the text's perplexity is one device's, and models.restore reshards 1 -> 8 -> 1 exactly."""
    mesh = sharding.make_mesh(4, 2)
    one, _ = models.load(HF_LLAMA)
    eight, _ = models.load(HF_LLAMA, mesh=mesh)
    placed = lambda m: [x.sharding for x in jax.tree.leaves(nnx.state(m))]  # noqa: E731
    assert placed(eight) == jax.tree.leaves(sharding.model_shardings(eight, mesh))
    q = eight.layers[0].self_attn.q_proj.kernel[...]
    assert q.shape == (32, 32) and {s.data.shape for s in q.addressable_shards} == {(32, 16)}
    text = PROMPT[:4, :16] % 128
    full = kvjax.policies.make("full", capacity=16)
    np.testing.assert_allclose(kvjax.evaluate.perplexity(eight, text, policy=full), kvjax.evaluate.perplexity(one, text, policy=full),
                               rtol=1e-5)
    restored = models.restore(models.save(one, tmp_path / "one"), mesh=mesh)
    assert placed(restored) == placed(eight)
    back = models.restore(models.save(restored, tmp_path / "eight"))
    for a, b, c in zip(*(jax.tree.leaves(nnx.state(m)) for m in (one, restored, back))):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(c, a)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(nnx.state(back)))


TEXT = "The cache has a fixed number of slots however long the context grows. " * 20


def training_run(mesh, steps: int, *, loss=None, workdir=None, stop_at: int | None = None):
    """`steps` steps of training the tiny model (batch 8; the DMC retrofit loss unless `loss` is given),
    on `mesh` or one device; with `stop_at`, the run crashes when it reaches that step (after its checkpoints)."""
    source = PackedBatches(byte_tokens(TEXT), seq_len=16, batch_size=8)

    def batches(step):
        if step == stop_at:
            raise RuntimeError("stopped")
        return source(step)

    m = model(mesh)
    config = TrainConfig(steps=steps, learning_rate=1e-3, checkpoint_every=2)
    log = train(m, loss or retrofit.dmc_loss(cr=2.0, ramp_steps=steps), batches, config, workdir=workdir, progress=False)
    return m, [r["loss"] for r in log]


def test_sharded_training_equals_one_device():
    """Five DMC retrofit steps, data parallel on 8 x 1 and with the weights over `model` on 4 x 2:
    the single device's losses (rtol 1e-5)."""
    _, want = training_run(None, 5)
    for shape in [(8, 1), (4, 2)]:
        m, got = training_run(sharding.make_mesh(*shape), 5)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert tuple(m.layers[0].mlp.up_proj.kernel[...].sharding.spec) == (None, "model" if shape[1] > 1 else None)


def test_training_checkpoints_move_between_meshes(tmp_path):
    """A run on 8 devices stops after its step-2 checkpoint; it resumes on one device (its step-3 loss
    is the uninterrupted run's) and checkpoints step 4; that checkpoint restores onto 8 devices exactly.
    (Next-token loss: what moves is the parameters and optimiser state, whatever the loss.)"""
    run = functools.partial(training_run, steps=4, loss=retrofit.language_model_loss())
    _, want = run(None)
    with pytest.raises(RuntimeError, match="stopped"):
        run(sharding.make_mesh(8, 1), workdir=tmp_path, stop_at=2)
    one, resumed = run(None, workdir=tmp_path)
    np.testing.assert_allclose(resumed, want[2:], rtol=1e-5)
    eight, nothing_left = run(sharding.make_mesh(8, 1), workdir=tmp_path)
    assert nothing_left == []
    for a, b in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(eight))):
        np.testing.assert_array_equal(b, a)
        assert len(b.sharding.device_set) == 8


@pytest.mark.slow
def test_smollm2_on_a_2x1_mesh_gives_the_one_device_tokens():
    """SmolLM2-135M's first 6 layers (real weights and head shapes), two rows over `data` (2 x 1): greedy
    h2o generation with a cache smaller than the sequence gives one device's tokens."""
    m, tokenizer = models.load("smollm2-135m")
    m = first_layers(m, 6)
    ids = tokenizer.encode(essay("worked"))
    prompt = np.asarray([ids[:64], ids[64:128]])
    h2o = kvjax.policies.make("h2o", capacity=48, window=4)
    want = kvjax.generate(m, prompt, policy=h2o, max_new_tokens=8, chunk_size=32).tokens
    got = kvjax.generate(sharding.shard_model(m, sharding.make_mesh(2, 1)), prompt, policy=h2o, max_new_tokens=8, chunk_size=32)
    assert tuple(got.cache.layers[0].k.sharding.spec)[:1] == ("data",)
    np.testing.assert_array_equal(got.tokens, want)
