"""MOON's views of an item: what each shows as text, and which one is served.

An item is seen in one of four views (`schema.ITEM_VIEWS`): its richer text (title,
category path, attribute values), its image, its title beside its image, or its richer
text beside its image. The text of each view is defined here once, for every embedder
(the baseline and the learned model alike). The served view is the one a model's store
versions, indexes and evaluation use; a model records it in its own settings
(`model.served_view`), so whoever loads the model serves what it was trained to serve.
"""

from __future__ import annotations

from collections.abc import Sequence

from moon.io.schema import ITEM_VIEWS

SERVED_VIEW = "richer-text+image"  # MOON serves items by their richer text beside their image


def item_text(title: str, category: Sequence[str] | None, attributes, view: str) -> str:
    """The text an item shows in `view` (one of ITEM_VIEWS); "" for the image view.

    `attributes` is a dict, or the (key, value) pairs Arrow gives for a map column. Only
    the values are written: keys ("colour", "brand") are the same for every item.
    """
    check_view(view)
    if view == "image":
        return ""
    if view == "title+image":
        return title or ""
    pairs = attributes.items() if isinstance(attributes, dict) else (attributes or ())
    parts = [title or "", " ".join(category or ()), " ".join(value for _, value in pairs if value)]
    return " ".join(part for part in parts if part)


def check_view(view: str) -> None:
    if view not in ITEM_VIEWS:
        raise ValueError(f"unknown item view {view!r}; expected one of {', '.join(ITEM_VIEWS)}")
