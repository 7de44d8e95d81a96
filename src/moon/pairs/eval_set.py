"""The image-search evaluation set: every (user photo, purchased item) of the test days."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from moon.io import schema

TEST = {"split": "test"}
TEST_PHOTO = {**TEST, "image_query": True}
CHOSEN = {**TEST_PHOTO, "action": "purchase"}


def image_search_eval_set(log, catalogue, accounting) -> Iterator[pa.Table]:
    """Every (user photo, purchased item) of the test days, in time order: the input of image-based search recall."""
    test, photo, chosen = log.count(TEST), log.count(TEST_PHOTO), log.count(CHOSEN)
    accounting.record(
        "evaluation", "test days: photo query + purchase", test, chosen,
        **{"text query": test - photo, "photo query, no purchase": photo - chosen},
    )
    for part in log.scan(["session_id", "photo", "item_id", "ts", "region", "user_id"], CHOSEN):
        spu = catalogue.spu[catalogue.codes(part["item_id"])].tolist()
        yield pa.table(
            {
                "query_id": part["session_id"],
                "query_image": part["photo"],
                "item_id": part["item_id"],
                "spu_id": pa.array(spu, pa.string()),
                "ts": part["ts"],
                "region": part["region"],
                "user_id": part["user_id"],
            },
            schema=schema.EVAL_IMAGE_SEARCH,
        )
