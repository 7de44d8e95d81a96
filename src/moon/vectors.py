"""Vectors as every stage compares them: rows of unit length, and Matryoshka prefixes.

MOON's representations are compared by cosine similarity, so every stored, indexed or
scored vector is L2-normalised. A Matryoshka dimension is a prefix of the full vector,
re-normalised: one stored vector serves every trained dimension.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from moon.errors import UserError


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prefix(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """The first `dim` columns (every column when None), L2-normalised, as C-contiguous float32.

    Refuses a row that is zero in those columns: it has no direction to compare.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D (rows, dims) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    if dim is not None:
        if not 1 <= dim <= x.shape[1]:
            raise ValueError(f"dim={dim} must lie in 1..{x.shape[1]} (the vectors' width)")
        x = x[:, :dim]
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{zero.size} vector(s) are zero in their first {x.shape[1]} dims (first: row {zero[0]}), "
                         "so they have no direction to compare")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def checked_dim(dim: int | None, dims: Collection[int], of: str) -> int:
    """`dim`, or the full width (the largest of `dims`) for None; refuses a dimension that `of` (a model,
    a store version) does not serve, saying which it does."""
    full = max(dims)
    if dim is None:
        return full
    if dim not in dims:
        raise UserError(f"dim={dim!r} is not a dimension of {of}: use one of {sorted(dims)}, "
                        f"or leave dim out for its full {full}")
    return dim
