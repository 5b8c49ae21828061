"""Read a GGUF file (llama or gemma3 architecture): config, dequantized tensors.

GGUF (llama.cpp's format) stores matrices as [out, in] after reversing its
own dimension order. For llama its converter permutes the rows of Q and K so
that RoPE rotates *adjacent* pairs; we keep the rows as stored and set
`rope_interleaved=True`, which is the same model. Gemma 3 files keep the
half-split layout and store RMSNorm weights with Gemma's +1 already added.
"""

from __future__ import annotations

import pathlib

import numpy as np

from models.llama import LlamaConfig

ARCHITECTURES = ("llama", "gemma3")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",  # llama: the norm before the FFN
    "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight",
}
_GEMMA3_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm.weight",
    "ffn_norm": "pre_feedforward_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
}
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer is global (not stored in the file)
GEMMA3_LOCAL_ROPE_THETA = 10_000.0  # RoPE base of the sliding layers (not stored in the file)
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


def hf_tensor_name(name: str, arch: str = "llama") -> str:
    """GGUF tensor name -> Hugging Face parameter name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    names = _GEMMA3_NAMES if arch == "gemma3" else _LAYER_NAMES
    blk, layer, kind, leaf = name.split(".")
    if blk != "blk" or kind not in names or leaf != "weight":
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{layer}.{names[kind]}"


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
    layers = int(get("block_count"))
    family = {}
    if arch == "gemma3":
        family = dict(
            head_dim=int(get("attention.key_length")), qk_norm=True, hidden_act="gelu_tanh", sandwich_norm=True,
            embed_scale=True, sliding_window=int(get("attention.sliding_window")),
            layer_types=tuple("full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention" for i in range(layers)),
            rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
        )
    cfg = LlamaConfig(
        vocab_size=int(reader.fields["tokenizer.ggml.tokens"].data.__len__()),
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_layers=layers,
        num_heads=int(get("attention.head_count")),
        num_kv_heads=int(get("attention.head_count_kv")),
        rope_theta=float(get("rope.freq_base")),
        rope_interleaved=arch == "llama",
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        dtype=dtype,
        **family,
    )
    tensors = {}
    for t in reader.tensors:
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as err:
            raise ValueError(f"{path}: tensor {t.name!r} uses quantization {t.tensor_type.name}, which gguf cannot dequantize") from err
        tensors[hf_tensor_name(t.name, arch)] = np.asarray(array, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
    return cfg, tensors, reader
