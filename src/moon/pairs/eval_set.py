"""The image-search evaluation set: every (user photo, purchased item) of the test days."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from moon.io import schema
from moon.pairs.log import session_photos, with_photos


def image_search_eval_set(log, catalogue, run_dir, settings, accounting) -> pa.Table:
    """Every (user photo, purchased item) of the test days: the input of image-based search recall."""
    acts = log.interactions
    test = acts.filter(pc.equal(acts["split"], "test"))
    chosen = test.filter(pc.and_(test["image_query"], pc.equal(test["action"], "purchase")))
    accounting.record(
        "evaluation", "test days: photo query + purchase", test.num_rows, chosen.num_rows,
        **{"text query": int(pc.sum(pc.invert(test["image_query"])).as_py() or 0),
           "photo query, no purchase": int(pc.sum(test["image_query"]).as_py() or 0) - chosen.num_rows},
    )
    chosen = with_photos(chosen, session_photos(run_dir, pc.unique(chosen["session_id"]), settings))
    spu = catalogue.spu[catalogue.codes(chosen["item_id"])].tolist()
    return pa.table(
        {
            "query_id": chosen["session_id"],
            "query_image": chosen["photo"],
            "item_id": chosen["item_id"],
            "spu_id": pa.array(spu, pa.string()),
            "ts": chosen["ts"],
            "region": chosen["region"],
            "user_id": chosen["user_id"],
        },
        schema=schema.EVAL_IMAGE_SEARCH,
    )
