"""Segments of the CTR test samples, where content should matter most or least.

- `new items`: items launched during the log's period, or never shown before the test days;
- `cold items`: items never shown before the test days (their ID embeddings learned nothing:
  cold start; only content can tell them apart);
- `category: <root>`: the top level of the item's category path;
- `long-tail shops`: the least-shown shops (impressions before the test days), as many as
  `ctr.long_tail_share` of the shops;
- `image queries`, `text queries`;
- `short history`: users with at most `ctr.short_history` behaviours before the sample.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon.config import MoonConfig
from moon.ctr.data import CtrData
from moon.queries import PHOTO

MAX_CATEGORIES = 8  # the most shown top-level categories get a segment each


def test_segments(config: MoonConfig, data: CtrData) -> dict[str, np.ndarray]:
    """{segment name: boolean mask over the test samples, in the order of data.splits['test']}."""
    items = data.catalogue
    test = data.splits["test"]
    before = np.concatenate([data.splits["train"], data.splits["valid"]])
    item_of = data.samples["item_row"] - 1  # -1: an item the catalogue lacks
    segments = {"all": np.ones(len(test), dtype=bool)}

    launched = items["created_at"].cast(pa.int64()).fill_null(0).to_numpy() > data.period_start
    shown_before = np.zeros(len(items) + 1, dtype=bool)
    shown_before[item_of[before]] = True
    segments["new items"] = (launched[item_of[test]] | ~shown_before[item_of[test]]) & (item_of[test] >= 0)
    segments["cold items"] = ~shown_before[item_of[test]] & (item_of[test] >= 0)  # no ID has seen a click on them

    roots = np.array([path[0] if path else "" for path in items["category"].to_pylist()] + [""], dtype=object)
    test_roots = roots[item_of[test]]
    names, counts = np.unique(test_roots, return_counts=True)
    for name in names[np.argsort(-counts)][:MAX_CATEGORIES]:
        segments[f"category: {name}"] = test_roots == name

    shops = np.array(items["shop_id"].to_pylist() + [None], dtype=object)
    shown = pc.value_counts(pa.array(shops[item_of[before]].tolist(), pa.string()).drop_null())
    counts = dict(zip(shown.field("values").to_pylist(), shown.field("counts").to_pylist()))
    every = sorted({s for s in shops if s is not None}, key=lambda s: (counts.get(s, 0), s))
    tail = set(every[: round(len(every) * config.ctr.long_tail_share)])
    segments["long-tail shops"] = np.array([shop in tail for shop in shops[item_of[test]]], dtype=bool)

    photo = data.samples["query_kind"][test] == data.vocabs["query_kind"].encode(pa.array([PHOTO]))[0]
    segments["image queries"], segments["text queries"] = photo, ~photo
    segments["short history"] = data.behaviour.lengths()[test] <= config.ctr.short_history
    return segments
