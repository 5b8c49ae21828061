"""Flax NNX decoders that run on a fixed-capacity kvjax cache."""

from models.llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
