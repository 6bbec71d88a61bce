"""Token files: a flat array of token ids (uint16, or uint32 for vocabularies above 65,536) behind a small
JSON header, read as a memory map so that a corpus far larger than memory costs nothing to open.

Layout: the 8 magic bytes ``MOSATOK1``, the header's length as a little-endian uint32, the UTF-8 JSON header
(``dtype``, ``num_tokens``, ``vocab_size``, ``eos_id``, ``num_documents``, ``tokenizer_sha256``) padded with
spaces to a 1024-byte block, then the ids. Files are written to a temporary name
and renamed, so a file with the final name is always complete; a file whose size does not match its header
is reported as truncated or corrupt.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .corpus import DataError

MAGIC = b"MOSATOK1"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenWriter:
    """Writes a token file chunk by chunk (memory stays one chunk), atomically: the ids go after a reserved
    header block under a temporary name; ``close()`` fills in the header and renames the file."""

    _HEADER_BLOCK = 1024  # bytes reserved for magic, length and JSON header; the ids start after it

    def __init__(self, path, *, vocab_size: int, eos_id: int, tokenizer_sha256: str = ""):
        self.path = Path(path)
        self.dtype = dtype_for(vocab_size)
        self.vocab_size, self.eos_id, self.tokenizer_sha256 = int(vocab_size), int(eos_id), tokenizer_sha256
        self.num_tokens = 0
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * self._HEADER_BLOCK)

    def write(self, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            self.abort()
            raise DataError(f"token ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        self.f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += int(ids.size)

    def close(self, num_documents: int) -> Path:
        header = {"dtype": self.dtype.name, "num_tokens": self.num_tokens, "vocab_size": self.vocab_size,
                  "eos_id": self.eos_id, "num_documents": int(num_documents),
                  "tokenizer_sha256": self.tokenizer_sha256}
        raw = json.dumps(header).encode()
        raw += b" " * (self._HEADER_BLOCK - len(MAGIC) - 4 - len(raw))
        try:
            self.f.seek(0)
            self.f.write(MAGIC + struct.pack("<I", len(raw)) + raw)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()


def write_tokens(path, ids: np.ndarray, *, vocab_size: int, eos_id: int, num_documents: int,
                 tokenizer_sha256: str = "") -> Path:
    """Write ``ids`` atomically to ``path``; returns the path."""
    w = TokenWriter(path, vocab_size=vocab_size, eos_id=eos_id, tokenizer_sha256=tokenizer_sha256)
    try:
        w.write(ids)
    except BaseException:
        w.abort()
        raise
    return w.close(num_documents)


def read_header(path) -> tuple[dict, int]:
    """(header, byte offset of the ids); raises DataError for anything but a whole, valid token file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise DataError(f"{path} is not a mosa token file (bad magic bytes)")
        (n,) = struct.unpack("<I", head[len(MAGIC):])
        if len(MAGIC) + 4 + n > size:
            raise DataError(f"{path} is truncated: its header runs past the end of the file")
        try:
            header = json.loads(f.read(n))
            dtype = np.dtype(header["dtype"])
            num_tokens = int(header["num_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} has a corrupt header ({e})") from None
    if dtype not in (np.uint16, np.uint32):
        raise DataError(f"{path} has dtype {dtype}, expected uint16 or uint32")
    offset = len(MAGIC) + 4 + n
    expected = offset + num_tokens * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says (corrupt)"
        raise DataError(f"{path} is {what}: {size} bytes, header says {expected}")
    return header, offset


def read_tokens(path) -> tuple[np.ndarray, dict]:
    """(read-only memory map of the ids, header)."""
    header, offset = read_header(path)
    if header["num_tokens"] == 0:
        return np.zeros(0, dtype=header["dtype"]), header
    ids = np.memmap(path, dtype=header["dtype"], mode="r", offset=offset, shape=(header["num_tokens"],))
    return ids, header
