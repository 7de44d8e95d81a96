"""What makes a store version's vectors: one interface over trained and untrained models.

`moon embed` fills a version through a `VersionEncoder`, whatever made it: `TrainedEncoder`
wraps an `Embedder` loaded from a model directory, and `moon.represent.controls` holds the
versions made without a trained model (the baseline, the random placebo, the oracle). An
encoder says what it is (`plan()`: the entries of the version plan that name the model, its
dims and the view its items are seen in), which catalogue columns it reads (`item_columns`),
whether it describes queries at all (`queries_absent`: why not), and encodes rows of either
kind a version holds (`encode(rows, of)`): catalogue items, and the behaviour log's distinct
queries (rows of `moon.queries.DISTINCT_QUERIES`: query_id, query_text, query_image).

A query is encoded the way `moon eval retrieval` encodes it: a text query through the model's
text path (`encode_texts`), a photo query through its image path (`encode_photos`). A text
query's id stands for every spelling that normalises to it; it is encoded as the log first
wrote it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from moon import ui
from moon.model.embedder import Embedder
from moon.model.inputs import Input
from moon.model.views import ItemViews
from moon.queries import PHOTO, kind
from moon.store.versions import ITEMS, checkpoint_digest

ITEM_COLUMNS = ("item_id", "title", "category", "attributes", "image")  # what an item view shows


class VersionEncoder:
    """Vectors of a version's items and queries, full dimension, float32 (n, dim)."""

    label: str
    item_columns: tuple[str, ...] = ("item_id",)
    queries_absent: str | None = None  # why this model describes no queries; None: it does

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def plan(self) -> dict:
        """The plan entries that say what makes the version: model, checkpoint_digest, dims,
        matryoshka_dims, item_view, bidirectional (and whatever rebuilds the encoder later)."""
        raise NotImplementedError

    def attach(self, version: Path) -> None:
        """Called with the version's folder before anything is encoded into it: an encoder with a
        state of its own keeps it there, so a resumed or incremental run encodes as the first did."""

    def encode(self, rows: pa.Table, of: str, advance: ui.Advance) -> np.ndarray:
        """Vectors of `rows` of one kind (items: catalogue rows; queries: distinct queries)."""
        if rows.num_rows == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_items(rows, advance) if of == ITEMS else self.encode_queries(rows, advance)

    def encode_items(self, items: pa.Table, advance: ui.Advance) -> np.ndarray:
        raise NotImplementedError

    def encode_queries(self, queries: pa.Table, advance: ui.Advance) -> np.ndarray:
        """Photo queries through `encode_photos`, text queries through `encode_texts`, in the rows' order."""
        photo = np.array([kind(query) == PHOTO for query in queries["query_id"].to_pylist()], dtype=bool)
        out = np.zeros((queries.num_rows, self.dim), dtype=np.float32)
        images, texts = queries["query_image"].to_pylist(), queries["query_text"].to_pylist()
        if photo.any():
            out[photo] = self.encode_photos([images[i] for i in np.flatnonzero(photo)], advance)
        if not photo.all():
            out[~photo] = self.encode_texts([texts[i] for i in np.flatnonzero(~photo)], advance)
        return out

    def encode_texts(self, texts: list[str], advance: ui.Advance) -> np.ndarray:
        raise NotImplementedError

    def encode_photos(self, photos: list[bytes], advance: ui.Advance) -> np.ndarray:
        raise NotImplementedError


class TrainedEncoder(VersionEncoder):
    """A MOON embedder from a model directory, loaded on first use, exactly as it was saved
    (or `embedder`, one already loaded from `path`)."""

    item_columns = ITEM_COLUMNS

    def __init__(self, path: Path, label: str, device: torch.device | str | None, batch_size: int,
                 item_view: str | None = None, embedder: Embedder | None = None):
        self.path, self.label, self.device, self.batch_size = Path(path), label, device, batch_size
        self._item_view = item_view  # default: the view the model serves
        self._embedder = embedder

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder.load(self.path, self.device)
        return self._embedder

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def item_view(self) -> str:
        return self._item_view or self.embedder.settings.served_view

    def plan(self) -> dict:
        settings = self.embedder.settings
        return {
            "model": self.label,
            "model_dir": str(self.path.resolve()),
            "checkpoint_digest": checkpoint_digest(self.path),
            "dims": self.dim,
            "matryoshka_dims": list(settings.matryoshka_dims),
            "item_view": self.item_view,
            "bidirectional": settings.bidirectional,
        }

    def encode_items(self, items: pa.Table, advance: ui.Advance) -> np.ndarray:
        inputs = ItemViews(items).inputs(range(items.num_rows), self.item_view)
        return self.embedder.encode(inputs, batch_size=self.batch_size, advance=advance)

    def encode_texts(self, texts: list[str], advance: ui.Advance) -> np.ndarray:
        return self.embedder.encode([Input(text, None) for text in texts], batch_size=self.batch_size, advance=advance)

    def encode_photos(self, photos: list[bytes], advance: ui.Advance) -> np.ndarray:
        return self.embedder.encode([Input(None, photo) for photo in photos], batch_size=self.batch_size,
                                    advance=advance)
