"""The official MoSA release's layer as a comparison, from a folder the user gives (never vendored)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path


def official_layer(path, d_model: int, num_mosa_heads: int, sparsity: float, num_dense_heads: int, seq_len: int,
                   head_dim: int = 64):
    """The official release's ``PureMoSA`` (or, with dense heads, its hybrid ``MoSA``) built from the ``mosa``
    package inside ``path`` (a checkout of github.com/piotrpiekos/MoSA). Raises ValueError naming ``path``
    when that package cannot be imported from it."""
    folder = Path(path)
    if not (folder / "mosa" / "__init__.py").is_file():
        raise ValueError(f"official release: no mosa/ package in {str(path)!r} (give the folder that holds it)")
    sys.path.insert(0, str(folder.resolve()))
    try:
        mosa = importlib.import_module("mosa")
        pure = importlib.import_module("mosa.MoSA").PureMoSA
        hybrid = importlib.import_module("mosa.hybrid").MoSA
    except ImportError as err:
        raise ValueError(f"official release: cannot import it from {str(path)!r}: {err}") from None
    finally:
        sys.path.remove(str(folder.resolve()))
    if Path(mosa.__file__).resolve().parent != (folder / "mosa").resolve():
        raise ValueError(f"official release: 'mosa' was already imported from {mosa.__file__}, not from {str(path)!r}")
    if num_dense_heads:
        return hybrid(d_model, head_dim, num_mosa_heads, num_dense_heads, seq_len, sparsity, hybrid_type="dense")
    return pure(num_mosa_heads, sparsity, d_model, head_dim)
