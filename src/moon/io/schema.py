"""Arrow schemas of every table MOON reads or writes, defined once.

Stages talk only through these tables in a run directory (DESIGN.md section 3);
a stage that adds a column adds it here.
"""

import pyarrow as pa

TIMESTAMP = pa.timestamp("ms", tz="UTC")

# The catalogue: one row per SKU.
ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("spu_id", pa.string(), nullable=False),  # the product its SKU variants share
        pa.field("title", pa.string(), nullable=False),
        pa.field("category", pa.list_(pa.string()), nullable=False),  # root -> leaf
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("image", pa.binary(), nullable=False),  # encoded main image (PNG/JPEG)
        pa.field("shop_id", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("created_at", TIMESTAMP),
    ]
)

ACTIONS = ("impression", "click", "cart", "purchase")

# The behaviour log: one row per action; a session is one query and its ranked results.
EVENTS = pa.schema(
    [
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("query_text", pa.string()),  # null for an image query
        pa.field("query_image", pa.binary()),  # user photo (JPEG), null for a text query
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),  # 1-based rank in the result list
        pa.field("action", pa.string(), nullable=False),  # one of ACTIONS
    ]
)

# Simulated users and the latent tastes the click model used (ground truth, never model input).
USERS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("style_taste", pa.list_(pa.float32()), nullable=False),
        pa.field("colours", pa.list_(pa.string()), nullable=False),
        pa.field("price_band", pa.int8(), nullable=False),
        pa.field("brands", pa.list_(pa.string()), nullable=False),
        pa.field("activity", pa.float32(), nullable=False),
    ]
)

# What the simulator knows about each item that the catalogue does not say outright:
# its visual style vector (drawn, or measured from a real image), pattern and price band.
ITEM_TRUTH = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("style", pa.list_(pa.float32()), nullable=False),
        pa.field("pattern", pa.string()),
        pa.field("colour", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("price_band", pa.int8()),
        pa.field("is_new", pa.bool_(), nullable=False),  # appeared during the simulated period
    ]
)

# What each simulated search query was about (ground truth, never model input): one row per
# distinct query (`moon.queries.query_id`), for the oracle representation of queries.
QUERY_TRUTH = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),  # the item the shopper had in mind (photographed, for a photo)
        pa.field("names_colour", pa.bool_(), nullable=False),  # a text query that names the item's colour
        pa.field("names_brand", pa.bool_(), nullable=False),
        pa.field("names_attribute", pa.bool_(), nullable=False),
    ]
)

# What the click model knew of each simulated impression (ground truth, never model input):
# the terms of its click probability, for the ceilings of `moon eval world` and `moon ctr eval`.
IMPRESSION_TRUTH = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),  # the search (session) that showed the item
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("day", pa.int16(), nullable=False),  # days since the log's first day
        pa.field("relevance", pa.float32(), nullable=False),  # to the query, in [0, 1]
        pa.field("fit", pa.float32(), nullable=False),  # to the shopper's taste, hidden facts included
        pa.field("appeal", pa.float32(), nullable=False),  # the item's, visible part and hidden part
        pa.field("finish", pa.float32(), nullable=False),  # the visible part of appeal (drawn in the image)
        pa.field("probability", pa.float32(), nullable=False),  # of a click: examination x attraction
        pa.field("clicked", pa.bool_(), nullable=False),
    ]
)

# MOON's item views and the nine stage-1 query->item tasks (DESIGN.md section 1).
ITEM_VIEWS = ("richer-text", "image", "title+image", "richer-text+image")
TASKS = (
    "text->richer-text",
    "text->image",
    "text->title+image",
    "text->richer-text+image",
    "image->image",
    "image->title+image",
    "image->richer-text+image",
    "title+image->title+image",
    "richer-text+image->richer-text+image",
)
SPLITS = ("train", "valid", "test")

# Post-training pairs: a query (text, user photo, or an item in some view) and the item it led to.
PAIRS = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),  # one of TASKS, "<query view>-><item view>"
        pa.field("query_view", pa.string(), nullable=False),  # text, image, title+image, richer-text+image
        pa.field("query_text", pa.string()),  # for a text query
        pa.field("query_image", pa.binary()),  # for an image query (the user photo)
        pa.field("query_item_id", pa.string()),  # for an item-as-query pair
        pa.field("pos_item_id", pa.string(), nullable=False),
        pa.field("pos_spu_id", pa.string(), nullable=False),  # SKUs of this SPU are positives too
        pa.field("item_view", pa.string(), nullable=False),  # one of ITEM_VIEWS
        pa.field("hard_neg_item_ids", pa.list_(pa.string()), nullable=False),
        pa.field("action", pa.string(), nullable=False),  # click, cart or purchase; labelled for a labelled query
        pa.field("weight", pa.float32(), nullable=False),
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS, by event day
    ]
)

# The held-out image-search evaluation set: user photos of the valid and test days and their items.
EVAL_IMAGE_SEARCH = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),  # the search session
        pa.field("query_image", pa.binary(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),  # the item photographed (or engaged with most)
        pa.field("spu_id", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),  # the session's strongest action on it, or "none"
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # valid (where recipes are chosen) or test
    ]
)

# Near-duplicate items of the catalogue (same image by perceptual hash, or same title by MinHash).
NEAR_DUPLICATES = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),  # items of one group count as one product
        pa.field("by", pa.string(), nullable=False),  # image, title, or image+title
    ]
)

# Input rows that could not be used, with the reason; nothing is dropped silently.
REJECTS = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # file the row came from
        pa.field("row", pa.int64()),  # 1-based line or row number in that file
        pa.field("item_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),  # one of REJECT_REASONS
        pa.field("detail", pa.string()),
    ]
)

REJECT_REASONS = (
    "missing_image",
    "corrupt_image",
    "image_too_large",
    "duplicate_id",
    "malformed_line",
    "empty_title",
    "missing_category",
    "missing_id",
)

# A labelled query set a user brought in (`moon ingest-queries`): queries matched to products by
# hand (a shopper's photo, a text with judged results), each with every item that counts as a hit.
LABELLED_QUERIES = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),  # the file's own id, else `moon.queries.query_id`
        pa.field("query_text", pa.string()),  # null for a photo-only query
        pa.field("query_image", pa.binary()),  # encoded photo, null for a text-only query
        pa.field("item_ids", pa.list_(pa.string()), nullable=False),  # relevant items, each in `items`
        pa.field("split", pa.string(), nullable=False),  # one of LABELLED_SPLITS
        pa.field("source", pa.string(), nullable=False),  # file the row came from
        pa.field("row", pa.int64(), nullable=False),  # 1-based line in that file
    ]
)
# train: pairs of post-training stage 1; test: a query set of `moon eval retrieval`.
LABELLED_SPLITS = ("train", "test")
# Why a labelled query row was rejected (a REJECTS row; its item_id names an unknown item).
LABELLED_REJECT_REASONS = (
    "malformed_line",
    "no_query",  # neither a text nor an image
    "missing_image",
    "corrupt_image",
    "image_too_large",
    "no_items",
    "unknown_item",
    "bad_split",
    "duplicate_id",  # a query id already kept from an earlier row
)

# CTR samples (`moon ctr build`): one row per impression. A sample's behaviour is not copied
# into it: it is looked up at load time in the per-user side tables below, strictly before `ts`.
CTR_SAMPLES = pa.schema(
    [
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("day", pa.int16(), nullable=False),  # days since the log's first day
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS, by day as in the pairs stage
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),  # the search (session) that showed the item
        pa.field("query_id", pa.string(), nullable=False),  # moon.queries.query_id
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),  # 1 if the impression was clicked
    ]
)
# Each user's behaviour: items clicked, carted or bought, in time order.
CTR_BEHAVIOUR = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),  # click, cart or purchase
    ]
)
# Each user's searches, in time order.
CTR_QUERIES = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
    ]
)

TABLES = {
    "items": ITEMS,
    "events": EVENTS,
    "users": USERS,
    "item_truth": ITEM_TRUTH,
    "query_truth": QUERY_TRUTH,
    "impression_truth": IMPRESSION_TRUTH,
    "rejects": REJECTS,
    "pairs_stage1": PAIRS,
    "pairs_stage2": PAIRS,
    "eval_image_search": EVAL_IMAGE_SEARCH,
    "near_duplicates": NEAR_DUPLICATES,
    "ctr_samples": CTR_SAMPLES,
    "ctr_behaviour": CTR_BEHAVIOUR,
    "ctr_queries": CTR_QUERIES,
    "labelled_queries": LABELLED_QUERIES,
}
