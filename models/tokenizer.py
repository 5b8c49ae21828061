"""Tokenizers for the models we load: from `tokenizer.json` or rebuilt from GGUF metadata."""

from __future__ import annotations

import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids generation needs."""

    backend: object
    bos_id: int | None
    eos_id: int | None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def from_json(path: pathlib.Path, bos_id: int | None, eos_id: int | None) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    return Tokenizer(Backend.from_file(str(path)), bos_id, eos_id)


def from_gguf(reader) -> Tokenizer:
    """Rebuild a GPT-2 style byte-level BPE (as SmolLM2's) from GGUF metadata."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    fields = reader.fields
    kind = fields["tokenizer.ggml.model"].contents()
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    types = fields["tokenizer.ggml.token_type"].contents()
    control = [tokens[i] for i, kind in enumerate(types) if kind == 3]  # llama.cpp's CONTROL tokens
    backend.add_special_tokens([AddedToken(t, special=True) for t in control])

    def ident(key):
        return int(fields[key].contents()) if key in fields else None

    return Tokenizer(backend, ident("tokenizer.ggml.bos_token_id"), ident("tokenizer.ggml.eos_token_id"))
