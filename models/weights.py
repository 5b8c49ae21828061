"""Put checkpoint tensors (Hugging Face names and layouts) into a Flax NNX Llama.

Every loader (Hugging Face safetensors folder, GGUF file) produces a mapping
from Hugging Face parameter names to arrays in Hugging Face layout ([out, in]
for linear weights); `build` checks every name and shape and builds the model
without a random initialisation pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvjax.sharding import model_shardings
from models.llama import Llama, LlamaConfig


def hf_name(path: tuple) -> tuple[str, bool]:
    """Hugging Face name of an NNX parameter path, and whether it is a transposed linear."""
    parts = [str(p) for p in path]
    if parts == ["embed_tokens", "embedding"]:
        return "model.embed_tokens.weight", False
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    if parts[0] == "norm":
        return "model.norm.weight", False
    # layers.<i>.<module>[.<sub>].(kernel|weight|bias)
    *mods, leaf = parts[1:]
    prefix = f"model.layers.{'.'.join(mods)}"
    if leaf == "kernel":
        return f"{prefix}.weight", True
    return f"{prefix}.{leaf}", False


def build(cfg: LlamaConfig, tensors: Mapping[str, np.ndarray], *, source: str, mesh: Mesh | None = None) -> Llama:
    """A `Llama` whose parameters are `tensors` (cast to `cfg.dtype`), on one device or, with
    `mesh`, sharded by `kvjax.sharding`'s rules as each tensor is placed: every device receives
    only its shard from host memory, so no device ever holds a whole model.

    Raises ValueError naming `source` and the tensor when one is missing or has
    the wrong shape; tensors the model does not use are reported too.
    """
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    places = [None] * len(flat) if mesh is None else [v.get_value() for _, v in nnx.to_flat_state(model_shardings(abstract, mesh))]
    dtype = jnp.dtype(cfg.dtype)
    used, leaves = set(), []
    for (path, var), place in zip(flat, places):
        name, transposed = hf_name(path)
        if name not in tensors:
            raise ValueError(f"{source}: tensor {name!r} is missing (needed for {'.'.join(map(str, path))})")
        array = np.asarray(tensors[name])
        want = tuple(var.get_value().shape)
        want = want[::-1] if transposed else want  # in the checkpoint's [out, in] layout
        if array.shape != want:
            raise ValueError(f"{source}: tensor {name!r} has shape {array.shape}, the config needs {want}")
        used.add(name)
        array = (array.T if transposed else array).astype(dtype)
        leaves.append(var.replace(jnp.asarray(array) if place is None else jax.device_put(array, place)))
    unused = sorted(set(tensors) - used - {"lm_head.weight"} if cfg.tie_embeddings else set(tensors) - used)
    if unused:
        raise ValueError(f"{source}: tensors not used by this architecture: {unused[:5]}{' ...' if len(unused) > 5 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state([(p, leaf) for (p, _), leaf in zip(flat, leaves)]))
