"""Read a llama-architecture GGUF file: config, dequantized tensors, tokenizer.

GGUF (llama.cpp's format) stores matrices as [out, in] after reversing its
own dimension order, and its converter permutes the rows of Q and K so that
RoPE rotates *adjacent* pairs; we keep the rows as stored and set
`rope_interleaved=True`, which is the same model.
"""

from __future__ import annotations

import pathlib

import numpy as np

from models.llama import LlamaConfig

ARCHITECTURES = ("llama",)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _reader(path: pathlib.Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises many kinds on a bad file
        raise ValueError(f"could not read GGUF file {path} (truncated or not GGUF?): {err}") from err


def _field(reader, key: str, path):
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"{path}: GGUF metadata {key!r} is missing")
    return field.contents()


def hf_tensor_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face parameter name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    blk, layer, kind, leaf = name.split(".")
    if blk != "blk" or kind not in _LAYER_NAMES or leaf != "weight":
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}"


def read(path, dtype: str = "float32") -> tuple[LlamaConfig, dict[str, np.ndarray], object]:
    """(config, Hugging Face-named float32 tensors, reader) of a GGUF file."""
    import gguf

    path = pathlib.Path(path)
    reader = _reader(path)
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {ARCHITECTURES}")
    get = lambda key: _field(reader, f"{arch}.{key}", path)  # noqa: E731
    names = {t.name for t in reader.tensors}
    cfg = LlamaConfig(
        vocab_size=int(reader.fields["tokenizer.ggml.tokens"].data.__len__()),
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=int(get("attention.head_count")),
        num_kv_heads=int(get("attention.head_count_kv")),
        rope_theta=float(get("rope.freq_base")),
        rope_interleaved=True,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        dtype=dtype,
    )
    tensors = {}
    for t in reader.tensors:
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as err:
            raise ValueError(f"{path}: tensor {t.name!r} uses quantization {t.tensor_type.name}, which gguf cannot dequantize") from err
        tensors[hf_tensor_name(t.name)] = np.asarray(array, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
    return cfg, tensors, reader
