"""Every Python block of README.md runs, so the documentation cannot rot.

The blocks run in order in one namespace, with `models.load` swapped for the
tiny random model and a byte-level tokenizer; `KVJAX_README_MODEL=smollm2-135m`
runs them on the real model instead.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest
from flax import nnx

import kvjax
import models
from models.tokenizer import Tokenizer

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def tiny_load(source, **_):
    model = models.Llama(models.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    tokenizer = Tokenizer(encode_fn=lambda t: list(t.encode()), decode_fn=lambda ids: bytes(ids).decode(errors="replace"),
                          vocab_size=256, bos_id=None, eos_id=0)
    return model, tokenizer


def test_readme_python_blocks_run(monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3, "the README's examples were not found"
    if os.environ.get("KVJAX_README_MODEL", "tiny") == "tiny":
        monkeypatch.setattr(models, "load", tiny_load)
    registry = dict(kvjax.policies.REGISTRY)
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
            except Exception as err:
                pytest.fail(f"README python block {i + 1} raised {type(err).__name__}: {err}\n{block}")
    finally:
        kvjax.policies.REGISTRY.clear()
        kvjax.policies.REGISTRY.update(registry)
    assert namespace["out"].tokens.shape[1] == 64
