import io

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from conftest import TINY_WORLD
from moon.config import load_config
from moon.io import schema
from moon.io.tables import read_manifest, read_table
from moon.queries import query_ids
from moon.sources.simulate.catalog import build_catalog, build_leaves, title
from moon.sources.simulate.render import PATTERNS
from moon.sources.simulate.write import simulate

SMALL = ["world.items=120", "world.leaf_categories=8", "behaviour.users=15", "behaviour.days=3"]


def small_world(tmp_path, *extra):
    config = load_config(None, [*TINY_WORLD, *SMALL, *extra])
    simulate(config, tmp_path)
    return tmp_path


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a = small_world(tmp_path / "a", "world.workers=1")  # drawn in-process; b by a pool of workers
    b = small_world(tmp_path / "b", "world.chunk_items=37")  # chunking must not change the world
    c = small_world(tmp_path / "c", "seed=1")
    for table in ("items", "events", "users", "query_truth"):
        assert read_table(a, table).equals(read_table(b, table)), table
    assert not read_table(a, "items").equals(read_table(c, "items"))
    assert not read_table(a, "events").equals(read_table(c, "events"))
    assert len(list((b / "items").glob("part-*.parquet"))) == 4


def test_tables_follow_the_schemas(tiny_world):
    for name in ("items", "events", "users", "item_truth", "query_truth"):
        table = read_table(tiny_world, name)
        assert table.schema.equals(schema.TABLES[name]), name
        assert table.num_rows > 0
        assert read_manifest(tiny_world, name)["simulated"] is True
    items = read_table(tiny_world, "items")
    assert pc.count_distinct(items["item_id"]).as_py() == items.num_rows
    assert set(pc.unique(read_table(tiny_world, "events")["action"]).to_pylist()) == set(schema.ACTIONS)


def test_default_tree_has_three_levels_and_fifty_leaves():
    config = load_config()
    leaves = build_leaves(config.world.leaf_categories, config.seed)
    assert len({leaf.path for leaf in leaves}) == len(leaves) >= 50
    assert all(len(leaf.path) == 3 for leaf in leaves)
    assert len({leaf.path[0] for leaf in leaves}) >= 5
    catalog = build_catalog(config.world, config.behaviour, config.seed)
    assert len(catalog) == config.world.items
    assert len(np.unique(catalog.leaf)) >= 50
    assert build_leaves(300, 0)[-1].path[2].split()[0] in {"Kids", "Premium", "Vintage", "Sport", "Eco"}


def test_skus_of_an_spu_are_variants_of_one_product(tiny_world):
    items = read_table(tiny_world, "items").to_pylist()
    by_spu = {}
    for item in items:
        by_spu.setdefault(item["spu_id"], []).append(item)
    multi = [skus for skus in by_spu.values() if len(skus) > 1]
    assert len(multi) >= 0.2 * len(by_spu), "too few SPUs with variants"
    for skus in multi:
        attrs = [dict(s["attributes"]) for s in skus]
        assert len({tuple(s["category"]) for s in skus}) == 1
        assert len({a["brand"] for a in attrs}) == 1 and len({s["shop_id"] for s in skus}) == 1
        variants = {(a["colour"], a.get("size")) for a in attrs}
        assert len(variants) == len(skus), "every SKU differs in colour or size"
        for a, b in zip(skus, skus[1:]):
            same_colour = dict(a["attributes"])["colour"] == dict(b["attributes"])["colour"]
            assert (a["image"] == b["image"]) == same_colour  # size variants look the same


def test_titles_are_noisy_and_never_name_the_pattern():
    config = load_config()
    catalog = build_catalog(config.world, config.behaviour, config.seed)
    titles = [title(catalog, i, config.world.title_noise) for i in range(600)]
    assert len(set(titles)) > 0.8 * len(titles)
    for i, text in enumerate(titles):
        assert PATTERNS[catalog.pattern[i]] not in text.lower().split()
    # the same leaf is named with several synonyms
    leaf = np.bincount(catalog.leaf[:600]).argmax()
    synonyms = catalog.leaves[leaf].synonyms
    used = {s for i in np.flatnonzero(catalog.leaf[:600] == leaf) for s in synonyms if s in titles[i].lower()}
    assert len(used) >= 2


def test_clicks_follow_the_users_visual_taste_at_the_same_position(tmp_path):
    run = small_world(
        tmp_path, "behaviour.users=200", "behaviour.days=5", "behaviour.image_query_share=0", "world.items=400"
    )
    events = read_table(run, "events").to_pandas()
    users = read_table(run, "users").to_pandas().set_index("user_id")
    truth = read_table(run, "item_truth").to_pandas().set_index("item_id")
    shown = events[events.action == "impression"].copy()
    clicked = set(zip(events.session_id[events.action == "click"], events.item_id[events.action == "click"]))
    shown["clicked"] = [(s, i) in clicked for s, i in zip(shown.session_id, shown.item_id)]
    style_user = np.stack(users.loc[shown.user_id, "style_taste"].to_numpy())
    style_item = np.stack(truth.loc[shown.item_id, "style"].to_numpy())
    shown["match"] = -np.linalg.norm(style_user - style_item, axis=1)
    differences = []
    for position in range(1, 5):
        at = shown[shown.position == position]
        high = at.match >= at.match.quantile(2 / 3)
        low = at.match <= at.match.quantile(1 / 3)
        differences.append(at.clicked[high].mean() - at.clicked[low].mean())
    assert all(d > 0 for d in differences), differences
    assert np.mean(differences) > 0.03, differences


def test_query_truth_names_the_item_each_distinct_query_had_in_mind(tiny_world):
    events = read_table(tiny_world, "events", ["session_id", "query_text", "query_image", "item_id", "action"])
    events = events.append_column("query_id", query_ids(events["query_text"], events["query_image"])).to_pandas()
    truth = read_table(tiny_world, "query_truth").to_pandas()
    assert truth.query_id.is_unique and set(truth.query_id) == set(events.query_id)
    assert set(truth.item_id) <= set(read_table(tiny_world, "items", ["item_id"])["item_id"].to_pylist())
    in_mind = truth.set_index("query_id").item_id
    # A photo is of the item in mind, which the engine's image search nearly always shows.
    shown = events[(events.action == "impression") & events.query_id.str.startswith("p")]
    found = shown.groupby("session_id").apply(lambda s: (s.item_id == in_mind[s.query_id.iloc[0]]).any())
    assert len(found) > 20 and found.mean() > 0.8, found.mean()
    texts = truth[truth.query_id.str.startswith("t")]
    assert texts.names_colour.any() and not texts.names_colour.all()
    assert not truth[truth.query_id.str.startswith("p")][["names_colour", "names_brand", "names_attribute"]].any().any()


def test_new_items_appear_during_the_period(tiny_world):
    items = read_table(tiny_world, "items", ["item_id", "created_at"])
    events = read_table(tiny_world, "events", ["ts", "item_id"])
    start = np.datetime64(read_manifest(tiny_world, "events")["period_start"], "ms").astype(np.int64)
    launched = dict(zip(items["item_id"].to_pylist(), items["created_at"].cast("int64").to_pylist()))
    new = {item for item, ts in launched.items() if ts >= start}
    assert 0.05 < len(new) / len(launched) < 0.35
    ts = events["ts"].cast("int64").to_numpy()
    shown = events["item_id"].to_pylist()
    assert all(t >= launched[item] for t, item in zip(ts, shown)), "an item was shown before its launch"
    day = (ts - start) // 86_400_000
    new_by_day = [{item for item, d in zip(shown, day) if d == k and item in new} for k in range(day.max() + 1)]
    assert len(new_by_day[-1]) > len(new_by_day[0]), "more new items are on show as the period goes on"


def test_image_queries_are_user_photos(tiny_world):
    events = read_table(tiny_world, "events", ["session_id", "query_text", "query_image", "action"])
    image_rows = events.filter(pc.is_valid(events["query_image"]))
    text_rows = events.filter(pc.is_valid(events["query_text"]))
    assert image_rows.num_rows > 0 and text_rows.num_rows > 0
    assert image_rows.num_rows + text_rows.num_rows == events.num_rows  # each query is one or the other
    photo = Image.open(io.BytesIO(image_rows["query_image"][0].as_py()))
    assert photo.format == "JPEG" and photo.size == (48, 48)


def test_shopper_photos_are_about_as_hard_for_the_baseline_as_real_shop_photos(tiny_world):
    """The world's calibration (`moon eval world`): each photo among its item and 80 others, by the
    baseline's colour/texture descriptor. Real shop photos: R@1 0.074, R@10 0.393 (aim 0.05-0.15,
    0.35-0.50); the bands here are wider for a tiny world's few photos and small images."""
    from moon.eval.world import photo_difficulty
    from moon.queries import query_id

    events = read_table(tiny_world, "events", ["query_image", "action"])
    photos = list(dict.fromkeys(events.filter(pc.is_valid(events["query_image"]))["query_image"].to_pylist()))
    truth = read_table(tiny_world, "query_truth", ["query_id", "item_id"])
    photographed = dict(zip(truth["query_id"].to_pylist(), truth["item_id"].to_pylist()))
    items = read_table(tiny_world, "items", ["item_id", "spu_id", "image"])
    row = {item: i for i, item in enumerate(items["item_id"].to_pylist())}
    targets = np.array([row[photographed[query_id(None, photo)]] for photo in photos])
    _, spu = np.unique(items["spu_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    found = photo_difficulty(photos, targets, items["image"].to_pylist(), spu, seed=0, draws=50)
    assert len(photos) >= 100
    assert found["R@1"]["value"] <= 0.3, found
    assert 0.2 <= found["R@10"]["value"] <= 0.65, found  # random: 0.123; the old world's photos: 0.72


def test_impression_truth_is_the_click_model_of_the_log(tiny_world):
    """Every impression of the log has its click model's terms, and the clicks are the log's."""
    truth = read_table(tiny_world, "impression_truth")
    events = read_table(tiny_world, "events", ["session_id", "item_id", "position", "action"])
    shown = events.filter(pc.equal(events["action"], "impression"))
    assert truth.num_rows == shown.num_rows
    key = lambda t, s: list(zip(t[s].to_pylist(), t["item_id"].to_pylist(), t["position"].to_pylist()))  # noqa: E731
    assert sorted(key(truth, "request_id")) == sorted(key(shown, "session_id"))
    clicks = events.filter(pc.equal(events["action"], "click"))
    clicked = truth.filter(truth["clicked"])
    assert sorted(key(clicked, "request_id")) == sorted(key(clicks, "session_id"))
    probability = truth["probability"].to_numpy()
    assert ((0 < probability) & (probability < 1)).all()
    clicked_rows = truth["clicked"].to_numpy(zero_copy_only=False)
    assert probability[clicked_rows].mean() > probability[~clicked_rows].mean()  # clicks follow the probability


def test_click_ceilings_rise_with_what_is_known(tiny_world):
    from moon.eval.world import click_ceilings

    config = load_config(None, [*TINY_WORLD, "pairs.valid_days=1", "pairs.test_days=2"])
    ceilings = click_ceilings(tiny_world, config)["models"]
    assert 0.5 < ceilings["position only"] < ceilings["+ true fit"] <= ceilings["true click probability"] + 0.01
    assert ceilings["+ true relevance"] > ceilings["position only"]


def test_appeal_and_hidden_taste_are_not_in_the_item_facts(tiny_world):
    """The oracle is built from item_truth: the hidden parts of appeal and taste must stay out of it."""
    columns = set(read_table(tiny_world, "item_truth").column_names)
    assert not columns & {"finish", "appeal", "hidden_appeal", "hidden_taste", "motif", "cut"}
