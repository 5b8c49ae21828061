"""Flax NNX decoders that run on a fixed-capacity kvjax cache, and their loaders."""

from models.llama import Llama, LlamaConfig
from models.checkpoints import load, restore, save

__all__ = ["Llama", "LlamaConfig", "load", "restore", "save"]
