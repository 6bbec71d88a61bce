"""Data: corpora, their document split, tokenizers, token files and batches."""
from .batches import eval_batches, train_batch
from .corpus import DEFAULT_SOURCE, DataError, load_documents, split_documents
from .prepare import DataConfig, PreparedData, open_prepared, prepare
from .tokenizer import TextTokenizer, gpt2_tokenizer, train_bpe
from .tokens import read_tokens, write_tokens

__all__ = [
    "DEFAULT_SOURCE", "DataConfig", "DataError", "PreparedData", "TextTokenizer", "eval_batches",
    "gpt2_tokenizer", "load_documents", "open_prepared", "prepare", "read_tokens", "split_documents",
    "train_batch", "train_bpe", "write_tokens",
]
