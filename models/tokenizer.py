"""Tokenizers for the models we load: from `tokenizer.json` or rebuilt from GGUF metadata."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Text <-> ids over a `tokenizers` or SentencePiece backend, plus the ids generation needs."""

    encode_fn: Callable[[str], list[int]]
    decode_fn: Callable[[list[int]], str]
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(self.encode_fn(text))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.decode_fn([int(i) for i in ids])


def _from_backend(backend, bos_id, eos_id) -> Tokenizer:
    return Tokenizer(
        encode_fn=lambda text: backend.encode(text, add_special_tokens=False).ids,
        decode_fn=lambda ids: backend.decode(ids, skip_special_tokens=False),
        vocab_size=backend.get_vocab_size(with_added_tokens=True), bos_id=bos_id, eos_id=eos_id,
    )


def from_json(path: pathlib.Path, bos_id: int | None, eos_id: int | None) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    return _from_backend(Backend.from_file(str(path)), bos_id, eos_id)


def from_gguf(reader) -> Tokenizer:
    """Rebuild the tokenizer stored in GGUF metadata: byte-level BPE ('gpt2', SmolLM2)
    or SentencePiece BPE with byte fallback ('llama', Gemma 3)."""
    kind = reader.fields["tokenizer.ggml.model"].contents()
    if kind == "gpt2":
        return _byte_level_bpe(reader.fields)
    if kind == "llama":
        return _sentencepiece(reader.fields)
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported ('gpt2' or 'llama')")


def _ident(fields, key):
    return int(fields[key].contents()) if key in fields else None


def _byte_level_bpe(fields) -> Tokenizer:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

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
    return _from_backend(backend, _ident(fields, "tokenizer.ggml.bos_token_id"), _ident(fields, "tokenizer.ggml.eos_token_id"))


def _sentencepiece(fields) -> Tokenizer:
    """A SentencePiece BPE model proto from the pieces, scores and types (byte
    fallback, no normalisation, no dummy prefix: Gemma 3's settings)."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()  # same numbering as SentencePiece's piece types
    # SentencePiece needs its unknown piece typed UNKNOWN; GGUF files may mark it CONTROL.
    unk = tokens.index("<unk>") if "<unk>" in tokens else _ident(fields, "tokenizer.ggml.unknown_token_id")
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        proto.pieces.add(piece=piece, score=score, type=2 if i == unk else kind)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id = unk
    spec.bos_id = _ident(fields, "tokenizer.ggml.bos_token_id")
    spec.eos_id = _ident(fields, "tokenizer.ggml.eos_token_id")
    spec.pad_id = _ident(fields, "tokenizer.ggml.padding_token_id") if "tokenizer.ggml.padding_token_id" in fields else -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return Tokenizer(
        encode_fn=sp.encode, decode_fn=sp.decode, vocab_size=sp.get_piece_size(),
        bos_id=spec.bos_id, eos_id=spec.eos_id,
    )
