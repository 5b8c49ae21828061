"""SPMD over a device mesh: logical axis names for every weight and cache buffer, one table of rules.

As in MaxText, each buffer names its axes logically ("batch", "kv_heads",
"mlp", ...), and `RULES` maps those names to the mesh axes `data` (batch rows)
and `model` (heads, the MLP's hidden dimension, the vocabulary). XLA's SPMD
partitioner then runs the jitted programs per shard. The cache follows its
contract: every buffer, the policies' state included, is [batch, kv_heads, ...],
so batch rows go over `data`, KV heads over `model`, and slots are never split;
a policy's update touches only its own (row, KV head) shard.

A dimension that the mesh axis does not divide is replicated over that axis,
with a warning that names the choice: SmolLM2 (3 KV heads) or Gemma-3-270M
(1 KV head) on a `model` axis of 2 keep their KV heads whole on every device
of the axis and shard only the query heads and the MLP.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kvjax.cache import KVCache

DATA, MODEL = "data", "model"

RULES: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "heads": MODEL,  # query heads (q_proj's outputs, o_proj's inputs)
    "kv_heads": MODEL,
    "mlp": MODEL,  # the gated MLP's hidden dimension
    "embed": None,  # the residual stream stays whole
    "head_dim": None,
    "slots": None,  # a policy ranks all of a head's slots: never split
}

# Logical axes of the Llama-family weights by their last two path names (`models.Llama`).
PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
}


def make_mesh(data: int, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over the first data * model devices, with the partitioner in charge (Auto axes)."""
    devices = jax.devices() if devices is None else devices
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices, {len(devices)} are here"
                         " (on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model])


def _sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def spec_for(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...], *, counts: dict[str, int] | None = None,
             what: str = "") -> PartitionSpec:
    """The PartitionSpec of a buffer with these logical axes: each axis on its rule's mesh axis when that
    axis divides it (`counts` gives the number of heads behind a flattened heads x head_dim axis)."""
    sizes, out = _sizes(mesh), []
    for name, dim in zip(axes, shape):
        mesh_axis = RULES.get(name) if name else None
        n = (counts or {}).get(name, dim)
        if mesh_axis is not None and sizes.get(mesh_axis, 1) > 1 and n % sizes[mesh_axis]:
            warnings.warn(f"{what}: {n} {name} do not divide over the {sizes[mesh_axis]} devices of mesh axis "
                          f"'{mesh_axis}'; they are replicated over it (use a '{mesh_axis}' axis that divides {n} to shard them)",
                          stacklevel=3)
            mesh_axis = None
        out.append(mesh_axis if mesh_axis is not None and sizes.get(mesh_axis, 1) > 1 else None)
    return PartitionSpec(*out)


def model_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """NamedShardings of the model's state (same tree as `nnx.state(model)`): weights by `PARAM_AXES`,
    everything else (norm scales) replicated. A head count the `model` axis does not divide warns once."""
    cfg = model.cfg
    counts = {"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}
    flat = []
    with _each_warning_once():
        for path, variable in nnx.to_flat_state(nnx.state(model)):
            axes = PARAM_AXES.get(tuple(str(p) for p in path[-2:]))
            spec = PartitionSpec() if axes is None else spec_for(mesh, axes, variable.shape, counts=counts, what="model")
            flat.append((path, variable.replace(NamedSharding(mesh, spec))))
    return nnx.from_flat_state(flat)


@contextlib.contextmanager
def _each_warning_once():
    """Collect the warnings of a walk over many buffers and give each distinct one once (not once per layer)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in sorted({str(w.message) for w in caught}):
        warnings.warn(message, stacklevel=4)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place the model's weights on `mesh` by the rules (in place; returns the model)."""
    nnx.update(model, jax.device_put(nnx.state(model), model_shardings(model, mesh)))
    return model


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """NamedShardings of a cache (same tree): [batch, kv_heads, ...] buffers over (data, model), `seen` over data."""
    with _each_warning_once():
        return jax.tree.map(
            lambda x: NamedSharding(mesh, spec_for(mesh, ("batch", "kv_heads")[: x.ndim], x.shape[:2], what="cache")), cache)


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """Place a cache on `mesh`: batch rows over `data`, KV heads over `model`, slots whole."""
    return jax.device_put(cache, cache_shardings(cache, mesh))


def batch_spec(mesh: Mesh, batch: int) -> NamedSharding:
    """Token arrays [batch, length]: rows over `data`."""
    return NamedSharding(mesh, spec_for(mesh, ("batch", None), (batch, 1), what="tokens"))


def mesh_of(model: nnx.Module | nnx.State) -> Mesh | None:
    """The mesh the model's weights live on, or None for a model on one device. Callers that split
    the model pass its state (here and in `mesh_context`, `on_model_mesh`): each traversal of the
    module graph is Python work (about 25 ms for SmolLM2) and its garbage brings on the collector's
    full passes, which took 200 ms out of some `generate` calls."""
    for leaf in jax.tree.leaves(model if isinstance(model, nnx.State) else nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def bytes_per_device(tree) -> dict:
    """Bytes of a pytree's arrays held by each device (from the arrays' shardings)."""
    held: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def mesh_context(model: nnx.Module | nnx.State):
    """`jax.set_mesh` of the model's mesh (nothing for a model on one device): jitted programs traced
    inside it run the Pallas kernels per shard (`per_shard`)."""
    mesh = mesh_of(model)
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def per_shard(fn, arrays: dict, *, batch: int, heads: int):
    """`fn(**arrays)` once per (data, model) shard under `jax.shard_map`, when the context mesh
    (`mesh_context`) has those axes; else one call. XLA's partitioner cannot split a Pallas custom
    call (it would gather every input onto each device), so the kernels run per shard explicitly.

    The kernels' contract makes every shard independent: arrays of rank >= 3 (and the outputs)
    are [batch, heads, ...], those of rank 2 are [batch, ...], and no result mixes rows or KV
    heads. An axis the mesh does not divide (3 KV heads on a model axis of 2) stays whole on
    every device of that mesh axis, which computes it redundantly, as the cache placement chose.
    """
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
    data = DATA if sizes.get(DATA, 1) > 1 and batch % sizes[DATA] == 0 else None
    model = MODEL if sizes.get(MODEL, 1) > 1 and heads % sizes[MODEL] == 0 else None
    if data is None and model is None:
        return fn(**arrays)
    head_major, rows = PartitionSpec(data, model), PartitionSpec(data)
    specs = {k: None if x is None else head_major if x.ndim >= 3 else rows for k, x in arrays.items()}
    return jax.shard_map(lambda a: fn(**a), mesh=mesh, in_specs=(specs,), out_specs=head_major, check_vma=False)(arrays)


def on_model_mesh(model: nnx.Module | nnx.State, cache: KVCache, *tokens):
    """The cache and [batch, length] token arrays placed on the mesh of the model's weights (unchanged
    for a model on one device): what `generate` and `evaluate` do, so a sharded model is all a
    caller shards, and the jitted loop keeps the cache sharded from the first step to the last."""
    mesh = mesh_of(model)
    if mesh is None:
        return (cache, *tokens)
    rows = batch_spec(mesh, cache.batch)
    return (shard_cache(cache, mesh), *(jax.device_put(t, rows) for t in tokens))
