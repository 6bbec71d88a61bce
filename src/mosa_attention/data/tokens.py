"""Token files: a flat array of token ids (uint16, or uint32 for vocabularies above 65,536) behind a small
JSON header, read as a memory map so that a corpus far larger than memory costs nothing to open.

Layout: the 8 magic bytes ``MOSATOK1``, the header's length as a little-endian uint32, the UTF-8 JSON header
(``dtype``, ``num_tokens``, ``vocab_size``, ``eos_id``, ``num_documents``, ``tokenizer_sha256``) padded with
spaces so that the ids start at a multiple of 64 bytes, then the ids. Files are written to a temporary name
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
_ALIGN = 64


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_tokens(path, ids: np.ndarray, *, vocab_size: int, eos_id: int, num_documents: int,
                 tokenizer_sha256: str = "") -> Path:
    """Write ``ids`` atomically to ``path``; returns the path."""
    path = Path(path)
    dtype = dtype_for(vocab_size)
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    header = {"dtype": dtype.name, "num_tokens": int(ids.size), "vocab_size": int(vocab_size),
              "eos_id": int(eos_id), "num_documents": int(num_documents), "tokenizer_sha256": tokenizer_sha256}
    raw = json.dumps(header).encode()
    pad = -(len(MAGIC) + 4 + len(raw)) % _ALIGN
    raw += b" " * pad
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(raw)) + raw)
            f.write(ids.astype(dtype, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
