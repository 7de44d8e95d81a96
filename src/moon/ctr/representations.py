"""Representation tables loaded from a named store version: dynamic loading into CTR models.

A CTR model never copies vectors into its samples: it holds row ids, and a
`RepresentationTable` maps rows to the vectors of one store version, float16, with a zero
row and a `present = False` flag for any item or query the version lacks. Switching versions
is loading another table for the same rows (`ctr.representations=v2-stage2`); the samples
stay as they are. A version is read through its manifest, so items it gained through
`moon embed --incremental` are there on the next load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moon.errors import UserError
from moon.store.versions import Store, StoreVersion

KINDS = {"item_id": "items", "query_id": "queries"}


@dataclass
class RepresentationTable:
    version: str
    dim: int
    vectors: torch.Tensor  # float16 (rows + 1, dim); row 0 is "none"
    present: torch.Tensor  # bool (rows + 1,)
    made_at: str = ""  # when the version was made: a store made anew reuses names (v1-stage2), not vectors

    @classmethod
    def load(cls, version: StoreVersion, keys: list[str], of: str, dim: int | None) -> RepresentationTable:
        """Vectors of `keys` (row i + 1 = keys[i]) from `version`, at Matryoshka `dim`."""
        kind = KINDS[of]
        dim = served_dim(version, dim)
        rows = version.rows(keys, of=kind)
        vectors = np.zeros((len(keys) + 1, dim), dtype=np.float16)
        present = np.zeros(len(keys) + 1, dtype=bool)
        if (rows >= 0).any():
            stored = version.vectors(dim, of=kind)
            vectors[1:][rows >= 0] = stored[rows[rows >= 0]]
            present[1:] = rows >= 0
        return cls(version.name, dim, torch.from_numpy(vectors), torch.from_numpy(present),
                   version.manifest.get("created_at", ""))

    @property
    def coverage(self) -> float:
        return float(self.present[1:].float().mean()) if len(self.present) > 1 else 0.0


def served_dim(version: StoreVersion, dim: int | None) -> int:
    """The dim a version serves for a requested one: the request itself when the version has
    it; the full width for a version without Matryoshka dims (baseline and control versions),
    which has no prefix to offer; otherwise a clear error."""
    if dim is None or dim == version.dim or dim in version.matryoshka_dims:
        return dim or version.dim
    if not version.matryoshka_dims:
        return version.dim
    raise UserError(f"store version {version.name} has dims {sorted({*version.matryoshka_dims, version.dim})}, "
                    f"not {dim}: set ctr.dim to one of them")


def resolve_version(run_dir: Path, name: str | None) -> StoreVersion:
    """A store version by name (`v1-stage2`) or by the model that made it (`stage2`, `baseline`,
    ...: its newest finished version)."""
    store = Store(run_dir)
    finished = store.versions()
    if name is None:
        name = "stage2"
    if name in finished:
        return store.open(name)
    made = [v for v in finished if store.open(v).manifest.get("model") == name]
    if made:
        return store.open(made[-1])
    raise UserError(f"no store version {name!r} in {store.root}: "
                    f"finished versions are {finished or 'none'}; make one with `moon embed --model {name}` "
                    "or name one with ctr.representations=<version>")
