"""TPU lowering without a TPU: `jax.export(platforms=["tpu"])` runs Pallas' Mosaic lowering here.

Interpret-mode tests cannot see what Mosaic's verifier rejects (bf16 decode did
fail it: see `pallas_kernels.blocks.scores`). Each export names its chip through
an abstract mesh, so the tuning table and the lowering rules that ask for the
chip generation see TPU v5e or v6e, and must hold the Mosaic custom call: an
interpreted kernel or an XLA fallback would hold none.
"""

from __future__ import annotations

import importlib
import itertools
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import kvjax
from kvjax.retrofit import dmc_loss
from kvjax.train import train_step
from models import Llama, LlamaConfig
from kvjax.quant import FORMATS
from pallas_kernels import cache_attention
from pallas_kernels.tuning import blocks_for, target_platform

CHIPS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
MOSAIC = "tpu_custom_call"
S = jax.ShapeDtypeStruct


def chip(kind: str) -> AbstractMesh:
    return AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform="tpu"))


def exported_for_tpu(fn, *args, kind: str = CHIPS["v5e"], **kwargs) -> str:
    """StableHLO of `fn` lowered for TPU chip `kind` (raises if any part fails to lower)."""
    with use_abstract_mesh(chip(kind)):
        fn = fn if hasattr(fn, "lower") else jax.jit(fn)
        return jax.export.export(fn, platforms=["tpu"])(*args, **kwargs).mlir_module()


# every kernel configuration: decode / a 64-token prefill chunk, f32 / bf16, head_dim 64-256,
# GQA groups 1, 4, 8 and MQA, and two option sets: all off with a capacity that is a multiple of
# the 512-key block, or all on (capacity 1,000, soft-cap, sliding window, attention mass)
HEADS = {"gqa1": (4, 1), "gqa4": (2, 4), "gqa8": (2, 8), "mqa": (1, 16)}  # (kv heads, group)
OPTIONS = {"plain": dict(capacity=1024), "all_options": dict(capacity=1000, softcap=30.0, window=256, mass=True)}
KERNEL_CASES = list(itertools.product(CHIPS, ["decode", "prefill"], ["float32", "bfloat16"], [64, 128, 256], HEADS, OPTIONS))


def exported_kernel(chip_name, kind, dtype, head_dim, heads, options, kv_dtype=None) -> tuple[str, tuple]:
    """`cache_attention` of one configuration exported for TPU; slots stored as `kv_dtype` (with
    their scales) if given. Returns the StableHLO text and the slots' shape [B, H, C, D]."""
    (h, group), opts = HEADS[heads], OPTIONS[options]
    b, s, c, dt = 2, 1 if kind == "decode" else 64, opts["capacity"], jnp.dtype(dtype)
    slots = dt if kv_dtype is None else FORMATS[kv_dtype].dtype
    args = (S((b, h, s * group, head_dim), dt), S((b, h, c, head_dim), slots), S((b, h, c, head_dim), slots), S((b, h, c), bool),
            S((b, h, s, head_dim), dt), S((b, h, s, head_dim), dt), S((b, s), bool))
    extras = {} if kv_dtype is None else dict(k_scale=S((b, h, c), jnp.float32), v_scale=S((b, h, c), jnp.float32))
    if "window" in opts:
        extras.update(cache_pos=S((b, h, c), jnp.int32), q_pos=S((b, s), jnp.int32))
    if opts.get("mass"):
        extras["stat_weights"] = S((b, s), jnp.float32)

    def run(*a, **kw):
        return cache_attention(*a, **kw, group=group, scale=head_dim**-0.5, softcap=opts.get("softcap"),
                               max_distance=opts["window"] - 1 if "window" in opts else None)

    return exported_for_tpu(run, *args, kind=CHIPS[chip_name], **extras), (b, h, c, head_dim)


def mosaic_calls(options: str) -> int:
    """Two regions (slots, chunk), and with the mass statistic their second passes."""
    return 4 if OPTIONS[options].get("mass") else 2


@pytest.mark.parametrize(("chip_name", "kind", "dtype", "head_dim", "heads", "options"), KERNEL_CASES)
def test_kernel_lowers_to_mosaic(chip_name, kind, dtype, head_dim, heads, options):
    text, _ = exported_kernel(chip_name, kind, dtype, head_dim, heads, options)
    assert text.count(MOSAIC) == mosaic_calls(options)


NARROW_CASES = list(itertools.product(CHIPS, ["decode", "prefill"], ["float32", "bfloat16"], ["int8", "fp8"], [64, 128], OPTIONS))


@pytest.mark.parametrize(("chip_name", "kind", "dtype", "kv_dtype", "head_dim", "options"), NARROW_CASES)
def test_narrow_slot_kernels_lower_to_mosaic(chip_name, kind, dtype, kv_dtype, head_dim, options):
    """The kernels read int8 / fp8 slots and their per-slot scales as stored: the narrow type is
    the kernel operand in the exported program (no dequantized copy is made before the call)."""
    text, shape = exported_kernel(chip_name, kind, dtype, head_dim, "gqa4", options, kv_dtype=kv_dtype)
    assert text.count(MOSAIC) == mosaic_calls(options)
    slots = "x".join(map(str, shape))
    assert f"{slots}x{MLIR_TYPE[kv_dtype]}" in text
    assert f"{slots}x{MLIR_TYPE[dtype]}" not in text  # never widened outside the kernel


MLIR_TYPE = {"int8": "i8", "fp8": "f8E4M3FN", "float32": "f32", "bfloat16": "bf16"}


def smollm2_shaped(**kw) -> LlamaConfig:
    """SmolLM2-135M's attention (9 query / 3 KV heads, head_dim 64, bf16), 2 layers, a small vocabulary."""
    return LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3,
                       rope_theta=100_000.0, tie_embeddings=True, dtype="bfloat16", **kw)


def gemma3_shaped(**kw) -> LlamaConfig:
    """Gemma-3-270M's attention (4 query / 1 KV head, head_dim 256, q/k norms, soft-capped scale), bf16,
    its layer pattern of 5 sliding-window layers and 1 global layer."""
    return LlamaConfig(vocab_size=512, hidden_size=640, intermediate_size=2048, num_layers=6, num_heads=4, num_kv_heads=1,
                       head_dim=256, qk_norm=True, hidden_act="gelu_tanh", sandwich_norm=True, norm_offset=1.0, embed_scale=True,
                       query_pre_attn_scalar=256.0, sliding_window=512, rope_local_theta=10_000.0, rope_theta=1_000_000.0,
                       layer_types=("sliding_attention",) * 5 + ("full_attention",), tie_embeddings=True, dtype="bfloat16", **kw)


MODELS = {"tiny": LlamaConfig.tiny, "smollm2": smollm2_shaped, "gemma3": gemma3_shaped}
POLICIES = {
    "h2o": dict(capacity=128),
    "snapkv": dict(capacity=128, window=16),
    "pod": dict(capacity=128, sinks=4, window=16),
    "dmc": dict(capacity=128),
    "kvmerger": dict(capacity=128),
}
SLIDING_REFUSED = {"pod", "dmc"}  # documented: these policies refuse sliding-window layers


def generate_program(cfg: LlamaConfig, policy: str, *, impl: str = "pallas", prompt: int = 96, kv_dtype: str | None = None) -> str:
    """generate's whole program (chunked prefill + decode while-loop) exported for TPU v6e, random weights;
    `kv_dtype` stores the slots in that format (`kvjax.quant`)."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DMC on a model never retrofitted
        cache = jax.eval_shape(lambda: model.cache_spec().init(kvjax.policies.make(policy, kv_dtype=kv_dtype, **POLICIES[policy]), 2))
    program = importlib.import_module("kvjax.generate")._generate
    return exported_for_tpu(
        program, graphdef, state, S((2, prompt), jnp.int32), S((2, prompt), bool), cache, jax.random.key(0), jnp.int32(8),
        kind=CHIPS["v6e"], sampler=kvjax.sampling.Sampler(), stop_tokens=(), steps=8, chunk_size=32, pad_id=0, impl=impl,
    )


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_generate_lowers_to_mosaic(model, policy):
    cfg = MODELS[model]()
    if cfg.layer_types and policy in SLIDING_REFUSED:
        with pytest.raises(ValueError, match="sliding"):
            generate_program(cfg, policy)
        return
    text = generate_program(cfg, policy)
    assert text.count(MOSAIC) >= 4 * cfg.num_layers  # prefill and decode: two regions each, per layer


@pytest.mark.parametrize(("policy", "kv_dtype"), [("h2o", "int8"), ("kvmerger", "fp8"), ("dmc", "int8")])
def test_generate_over_quantized_slots_lowers_to_mosaic(policy, kv_dtype):
    """Each program lowers for TPU with the narrow buffers as its cache. H2O's kernels read its
    slots as stored (so do KVMerger's here: it leaves the first two layers to H2O, as the paper
    does); DMC runs on a dequantized view (kvjax.policies.quantized), so its kernels read bf16."""
    cfg = smollm2_shaped()
    text = generate_program(cfg, policy, kv_dtype=kv_dtype)
    assert text.count(MOSAIC) >= 4 * cfg.num_layers
    narrow = f"x{MLIR_TYPE[kv_dtype]}>"
    assert narrow in text
    reads_narrow = sum(narrow in line for line in text.splitlines() if MOSAIC in line)
    assert reads_narrow == (0 if policy == "dmc" else 4 * cfg.num_layers)  # decode + prefill: the slots' pass and their mass


def test_auto_exports_the_kernels_for_tpu():
    """impl="auto" follows the chip being compiled for, not the CPU host: the TPU export holds
    Mosaic calls, and the tuning row and kernel variant are the target's."""
    text = generate_program(LlamaConfig.tiny(), "h2o", impl="auto")
    assert text.count(MOSAIC) >= 8
    with use_abstract_mesh(chip(CHIPS["v6e"])):
        assert target_platform() == "tpu" and blocks_for("tpu") == blocks_for("tpu", "TPU v6 lite")
    assert target_platform() == "cpu"


def test_a_dmc_retrofit_training_step_lowers_for_tpu():
    """Loss, gradients and AdamW of DMC's retrofit stage. Training attention is XLA (DMC's
    intermediate-state bias mask has no kernel), so it holds no Mosaic call; it must lower."""
    model = nnx.eval_shape(lambda: Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt_state = jax.eval_shape(tx.init, params)
    step = train_step(graphdef, rest, tx, dmc_loss(2.0, ramp_steps=10), seed=0)
    text = exported_for_tpu(step, params, opt_state, S((2, 33), jnp.int32), jnp.int32(0), kind=CHIPS["v6e"])
    assert "stablehlo.dot_general" in text and MOSAIC not in text


def test_tuning_rows_follow_the_chip():
    assert blocks_for("tpu", "TPU v6 lite").block_k > blocks_for("tpu", "TPU v5 lite").block_k  # v6e's wider MXU
    assert blocks_for("gpu", "NVIDIA H100 80GB HBM3").programs == 264
    assert blocks_for("gpu", "some new GPU") == blocks_for("gpu", "")
    assert blocks_for("tpu", "TPU v7x") == blocks_for("tpu", "")
