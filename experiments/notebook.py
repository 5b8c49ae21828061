"""What every notebook in `colab/` shares: its model, where it runs, and where it keeps files.

The notebooks run SmolLM2-135M by default; `KVJAX_NOTEBOOK_MODEL=tiny` runs the
same cells on the tiny random-weight model with a byte tokenizer (how the tests
execute them), and any other value is a `models.load` source (a named default,
a hub id, a folder or a .gguf file).
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax
from flax import nnx

from experiments.ruler import ByteTokenizer
from kvjax.attention import resolve_impl
from models import Llama, LlamaConfig, load

MODEL_ENV = "KVJAX_NOTEBOOK_MODEL"
DRIVE = pathlib.Path("/content/drive/MyDrive")


def model_name(default: str = "smollm2-135m") -> str:
    return os.environ.get(MODEL_ENV, default)


def model_and_tokenizer(name: str, dtype: str = "float32"):
    """`models.load(name, dtype=dtype)`, or for "tiny" the 2-layer random-weight model and a byte tokenizer."""
    if name == "tiny":
        return Llama(LlamaConfig.tiny(dtype=dtype), rngs=nnx.Rngs(0)), ByteTokenizer()
    return load(name, dtype=dtype)


def accelerated() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def runtime() -> str:
    """One line: the JAX version, the devices, and which attention implementation `impl="auto"` runs."""
    devices = jax.devices()
    impl = resolve_impl("auto")
    kernel = "the Pallas kernels" if impl == "pallas" else "the XLA reference (the CPU path)"
    return f"JAX {jax.__version__} on {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}): attention runs {kernel}"


def workdir(name: str) -> pathlib.Path:
    """A folder for checkpoints and results: on Google Drive when Colab has it mounted (so a
    restarted runtime resumes from it), else under ./results."""
    base = DRIVE / "kvjax" if "google.colab" in sys.modules and DRIVE.is_dir() else pathlib.Path("results")
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup(dtype: str = "float32", default: str = "smollm2-135m"):
    """A notebook's first step after the install: print where it runs and load its model
    (`KVJAX_NOTEBOOK_MODEL`, else `default`). dtype "auto": bfloat16 on a GPU/TPU, else float32.
    Returns (name, tiny, model, tokenizer)."""
    print(runtime())
    name = model_name(default)
    if dtype == "auto":
        dtype = "bfloat16" if accelerated() else "float32"
    model, tokenizer = model_and_tokenizer(name, dtype)
    print(f"{name}: {model.cfg.num_layers} layers, {dtype}")
    return name, name == "tiny", model, tokenizer
