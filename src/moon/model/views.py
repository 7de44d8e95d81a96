"""MOON's views as model inputs: what a query or an item shows the embedder.

An item is seen in one of four views (`moon.views`: the text each shows is defined there
once, for every embedder). A query is a text, a user photo, or an item in one of those views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from moon.model.inputs import Input
from moon.views import item_text


class ItemViews:
    """The catalogue held for building inputs: any item, by row or id, in any view."""

    def __init__(self, items: pa.Table):
        self.item_ids = items["item_id"].to_pylist()
        self.row = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.titles = items["title"].to_pylist()
        self.categories = items["category"].to_pylist()
        self.attributes = items["attributes"].to_pylist()
        self.images = items["image"].to_pylist()

    def __len__(self) -> int:
        return len(self.item_ids)

    def input(self, row: int, view: str) -> Input:
        text = item_text(self.titles[row], self.categories[row], self.attributes[row], view)
        image = self.images[row] if view.endswith("image") else None
        return Input(text or None, image)

    def inputs(self, rows: Sequence[int] | np.ndarray, view: str) -> list[Input]:
        return [self.input(int(row), view) for row in rows]

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        missing = [item_id for item_id in item_ids if item_id not in self.row]
        if missing:
            raise KeyError(f"{len(missing)} item ids are not in the catalogue, e.g. {missing[0]!r}")
        return np.array([self.row[item_id] for item_id in item_ids], dtype=np.int64)

    def texts(self, view: str = "richer-text") -> list[str]:
        """Every item's text in `view`, e.g. as a tokenizer corpus."""
        return [item_text(t, c, a, view) for t, c, a in zip(self.titles, self.categories, self.attributes)]


def query_input(view: str, text: str | None, image: bytes | None, item_row: int | None, items: ItemViews) -> Input:
    """A pair's query: a text, a user photo, or an item (`item_row`) in an item view."""
    if view == "text":
        return Input(text, None)
    if view == "image":
        return Input(None, image)
    return items.input(item_row, view)
