"""From a source to a prepared dataset: a folder with the tokenizer and one token file per split.

``prepare(DataConfig(...))`` splits the documents, trains the tokenizer on the training split, encodes each
split (every document followed by the end-of-document token) and writes::

    <cache>/data/<name>-<key>/meta.json  tokenizer.json  train.bin  val.bin  test.bin

The key hashes everything the result depends on, so a second run with the same settings reuses the
folder, and a changed setting makes a new one. The folder is built under a temporary name and renamed, so
it is complete or absent. Such a folder (or a single token file with a ``tokenizer.json`` beside it) is
itself a valid ``source``: copy it to another machine and train there without the original text.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .corpus import (DEFAULT_SOURCE, SPLITS, DataError, cache_root, load_documents, source_fingerprint,
                     split_documents)
from .tokenizer import KINDS, TextTokenizer, make_tokenizer
from .tokens import TokenWriter, read_tokens

FORMAT_VERSION = 1


@dataclass
class DataConfig:
    source: str = DEFAULT_SOURCE  # "wiki", a folder/glob/file of text, "hf:NAME[:CONFIG[:SPLIT]]", or prepared data
    tokenizer: str = "bpe"  # "bpe" (trained on the train split), "gpt2", or a path to a tokenizer.json
    vocab_size: int = 8192  # for "bpe"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    max_documents: int | None = None  # read at most this many documents (for huge or streamed sources)
    hf_text_field: str = "text"
    cache_dir: str | None = None  # default: $MOSA_CACHE_DIR or ~/.cache/mosa-attention


class PreparedData:
    """A prepared dataset: ``tokenizer`` and ``tokens(split)`` (a read-only uint16/uint32 array)."""

    def __init__(self, root: Path, tokenizer: TextTokenizer, splits: dict[str, np.ndarray], meta: dict):
        self.root, self.tokenizer, self._splits, self.meta = root, tokenizer, splits, meta

    def tokens(self, split: str) -> np.ndarray:
        if split not in self._splits:
            raise DataError(f"split must be one of {sorted(self._splits)}, got {split!r}")
        return self._splits[split]

    def summary(self) -> str:
        parts = ", ".join(f"{s} {len(a):,}" for s, a in self._splits.items())
        return f"{self.root} (tokens: {parts}; vocab {self.tokenizer.vocab_size})"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_prepared(path) -> bool:
    p = Path(path)
    return (p.is_dir() and (p / "meta.json").is_file()) or (p.is_file() and p.suffix == ".bin")


def cache_key(cfg: DataConfig) -> str:
    tok = cfg.tokenizer
    if tok not in KINDS:
        tok = {"file": _sha256(Path(tok).read_bytes())} if Path(tok).is_file() else tok
    blob = {"version": FORMAT_VERSION, "data": source_fingerprint(cfg.source), "tokenizer": tok,
            "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None, "val": cfg.val_fraction,
            "test": cfg.test_fraction, "seed": cfg.split_seed, "max_documents": cfg.max_documents,
            "hf_text_field": cfg.hf_text_field if cfg.source.startswith("hf:") else None}
    return _sha256(json.dumps(blob, sort_keys=True).encode())[:16]


def _encode_to(path: Path, tok: TextTokenizer, docs: list[str], tok_sha: str, chunk: int = 2048) -> int:
    """Encode ``docs`` (each followed by EOS) into a token file, a chunk of documents at a time."""
    with TokenWriter(path, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_sha256=tok_sha) as w:
        for i in range(0, len(docs), chunk):
            ids = [t for seq in tok.encode_batch(docs[i:i + chunk]) for t in (*seq, tok.eos_id)]
            w.write(np.asarray(ids, dtype=np.int64))
        w.close(len(docs))
        return w.num_tokens


def build(cfg: DataConfig, out: Path, log=print) -> None:
    """Split, train the tokenizer and encode into the folder ``out`` (which must not exist)."""
    t0 = time.time()
    docs = load_documents(cfg.source, hf_text_field=cfg.hf_text_field, max_documents=cfg.max_documents)
    splits = split_documents(docs, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    log(f"data: {len(docs):,} documents -> " + ", ".join(f"{s} {len(d):,}" for s, d in splits.items()))
    if cfg.tokenizer in KINDS:
        what = f"training a {cfg.vocab_size}-token BPE on the train split" if cfg.tokenizer == "bpe" else "GPT-2 BPE"
        log(f"tokenizer: {what}")
        tok = make_tokenizer(cfg.tokenizer, splits["train"], cfg.vocab_size)
    else:
        tok = TextTokenizer.load(cfg.tokenizer)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tok.save(tmp / "tokenizer.json")
        tok_sha = _sha256((tmp / "tokenizer.json").read_bytes())
        meta = {"format_version": FORMAT_VERSION, "source": cfg.source, "config": asdict(cfg),
                "tokenizer_sha256": tok_sha, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "splits": {}}
        for name in SPLITS:
            n = _encode_to(tmp / f"{name}.bin", tok, splits[name], tok_sha)
            meta["splits"][name] = {"documents": len(splits[name]), "tokens": n}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "meta.json").is_file():  # lost a race to another process: theirs is as good
                raise
    except OSError as e:
        why = "no space left on device" if e.errno == errno.ENOSPC else str(e)
        raise DataError(f"could not write the prepared data to {out}: {why}. Nothing was left behind; "
                        f"free space or set --cache-dir") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: prepared in {time.time() - t0:.1f}s -> {out}")


def open_prepared(path) -> PreparedData:
    """Open a prepared folder, or a single token file (``tokenizer.json`` beside it) whose tail documents
    become the validation and test splits."""
    path = Path(path)
    if path.is_dir():
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {meta_file}: {e}") from None
        tok = TextTokenizer.load(path / "tokenizer.json")
        splits = {}
        for name in SPLITS:
            ids, header = read_tokens(path / f"{name}.bin")
            _check_header(path / f"{name}.bin", header, tok)
            splits[name] = ids
        return PreparedData(path, tok, splits, meta)
    tok = TextTokenizer.load(path.with_name("tokenizer.json"))
    ids, header = read_tokens(path)
    _check_header(path, header, tok)
    return PreparedData(path, tok, split_token_stream(ids, tok.eos_id), {"source": str(path), "header": header})


def _check_header(path: Path, header: dict, tok: TextTokenizer) -> None:
    if header["vocab_size"] != tok.vocab_size or header["eos_id"] != tok.eos_id:
        raise DataError(f"{path} was made with another tokenizer (vocab {header['vocab_size']}, "
                        f"eos {header['eos_id']}; the tokenizer beside it has {tok.vocab_size}, {tok.eos_id})")


def split_token_stream(ids: np.ndarray, eos_id: int, val_fraction: float = 0.05,
                       test_fraction: float = 0.05) -> dict[str, np.ndarray]:
    """Cut one token stream into train / val / test at document ends (EOS), the last documents held out."""
    ends = np.flatnonzero(ids == eos_id) + 1
    if len(ends) < 3:
        raise DataError(f"a single token file needs at least 3 documents (EOS-separated) to split, found {len(ends)}")

    def cut(fraction_from_end: float) -> int:
        i = min(max(int(len(ends) * (1 - fraction_from_end)), 1), len(ends) - 1)
        return int(ends[i - 1])

    a, b = cut(val_fraction + test_fraction), cut(test_fraction)
    b = max(b, a)
    return {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}


def prepare(cfg: DataConfig, log=print) -> PreparedData:
    """The prepared dataset for ``cfg``: opened directly if the source is prepared data, else built
    (or found) in the cache."""
    if is_prepared(cfg.source):
        return open_prepared(cfg.source)
    if not cfg.source.startswith("hf:") and cfg.source != "wiki" and not _exists(cfg.source):
        raise DataError(f"data source not found: {cfg.source!r}")
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
    name = "wiki" if cfg.source == "wiki" else Path(cfg.source.rstrip("/*")).name.replace(":", "_") or "data"
    out = root / "data" / f"{name}-{cache_key(cfg)}"
    if (out / "meta.json").is_file():
        log(f"data: using cached {out}")
    else:
        build(cfg, out, log)
    return open_prepared(out)


def _exists(source: str) -> bool:
    return Path(source).expanduser().exists() or bool(glob.glob(source, recursive=True))
