import json
import math

import numpy as np
import pyarrow as pa
import pytest

from moon.errors import UserError
from moon.eval import metrics
from moon.eval.metrics import (
    CatalogueMismatch,
    bootstrap_ci,
    exact_search,
    first_relevant_rank,
    recall_at_k,
    relevant_items,
    relevant_sets,
    retrieval_recall,
    top_k,
    without_self,
)
from moon.eval.retrieval import ITEM_QUERY_VIEWS, held_out
from moon.io import schema
from moon.io.tables import TableWriter
from moon.vectors import prefix


def unit(degrees):
    """2-D unit vectors at the given angles."""
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def reference_ranking(queries, catalogue, k):
    """Brute force: exact scores (the test vectors are small integers), then score desc, index asc."""
    scores = queries.astype(np.float64) @ catalogue.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(catalogue.shape[0]), scores.shape), -scores), axis=1)
    return order[:, :k]


# ---------------------------------------------------------------- search


def test_query_item_ranked_third_counts_from_recall_at_3():
    # Query at 0 degrees; catalogue items at 10, 20, 30, 90 and 180 degrees, stored out of order.
    catalogue = unit([30, 90, 10, 180, 20])
    queries = unit([0, 85])
    scores, ranked = exact_search(queries, catalogue, k=3)
    assert ranked[0].tolist() == [2, 4, 0]  # 10, 20, 30 degrees
    assert ranked[1].tolist() == [1, 0, 4]  # 90, 30, 20 degrees from 85
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores[0], np.cos(np.deg2rad([10, 20, 30])), atol=1e-6)

    relevant = [{0}, {1}]  # query 0 bought the 30-degree item (3rd); query 1 the 90-degree one (1st)
    hits = recall_at_k(ranked, relevant, ks=[1, 2, 3])
    assert hits[1].tolist() == [0.0, 1.0]
    assert hits[2].tolist() == [0.0, 1.0]
    assert hits[3].tolist() == [1.0, 1.0]
    assert first_relevant_rank(ranked, relevant).tolist() == [2, 0]
    assert first_relevant_rank(ranked, [{3}, {3}]).tolist() == [-1, -1]  # 180 degrees: never in the top 3


def test_equal_scores_rank_lower_catalogue_index_first_across_the_kth_place():
    # Rows 5..9 are identical and tie for the top; faiss alone returns them in another order.
    catalogue = np.array([[0, 1]] * 5 + [[1, 0]] * 5, np.float32)
    for nq in (1, 30):  # faiss computes small and large query batches on different code paths
        queries = np.tile(np.array([[1, 0]], np.float32), (nq, 1))
        scores, ranked = exact_search(queries, catalogue, k=3)
        assert (ranked == [5, 6, 7]).all()
        assert (scores == 1.0).all()
        _, ranked = exact_search(queries, catalogue, k=7)
        assert (ranked == [5, 6, 7, 8, 9, 0, 1]).all()


@pytest.mark.parametrize("nq", [3, 40])
@pytest.mark.parametrize("k", [1, 4, 25, 120, 500])
def test_exact_search_matches_brute_force_with_many_ties(nq, k, monkeypatch):
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 16)  # several faiss calls per search
    rng = np.random.default_rng(7)
    distinct = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    catalogue = distinct[rng.integers(0, 40, size=300)]  # every vector appears about 7 times
    queries = rng.integers(-2, 3, size=(nq, 6)).astype(np.float32)
    scores, ranked = exact_search(queries, catalogue, k)
    expected = reference_ranking(queries, catalogue, min(k, 300))
    assert ranked.shape == (nq, min(k, 300))
    np.testing.assert_array_equal(ranked, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(queries @ catalogue.T, expected, axis=1))


def test_search_rejects_unusable_input():
    catalogue = unit([0, 90])
    with pytest.raises(ValueError, match="dims"):
        exact_search(np.ones((1, 3), np.float32), catalogue, 1)
    with pytest.raises(ValueError, match="NaN"):
        exact_search(np.array([[np.nan, 1]], np.float32), catalogue, 1)
    with pytest.raises(ValueError, match="empty"):
        exact_search(unit([0]), np.zeros((0, 2), np.float32), 1)
    with pytest.raises(ValueError, match="zero"):
        prefix(np.array([[0, 0, 1]], np.float32), dim=2)
    with pytest.raises(ValueError, match="1..3"):
        prefix(np.ones((1, 3), np.float32), dim=4)


def test_matryoshka_prefix_renormalises_and_can_change_the_ranking():
    queries = np.array([[1, 0, 1]], np.float32)
    catalogue = np.array([[1, 0, -1], [0, 1, 1]], np.float32)
    # Full vectors: cosine 0 with row 0, 0.5 with row 1.  First two dims: 1 with row 0, 0 with row 1.
    scores, ranked = top_k(queries, catalogue, k=2)
    assert ranked[0].tolist() == [1, 0]
    np.testing.assert_allclose(scores[0], [0.5, 0.0], atol=1e-6)
    scores, ranked = top_k(queries, catalogue, k=2, dim=2)
    assert ranked[0].tolist() == [0, 1]
    np.testing.assert_allclose(scores[0], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(prefix(catalogue, 2), axis=1), 1.0, atol=1e-6)

    report = retrieval_recall(queries, catalogue, [{1}], ks=[1], dims=[2, None])
    assert report.recall[3][1].value == 1.0
    assert report.recall[2][1].value == 0.0


# ---------------------------------------------------------------- recall


def test_recall_hits_match_a_plain_loop(monkeypatch):
    monkeypatch.setattr(metrics, "_CELLS", 7)  # many small match chunks
    rng = np.random.default_rng(3)
    ranked = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    relevant = [set(rng.choice(50, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(30)]
    hits = recall_at_k(ranked, relevant, ks=[1, 5, 10])
    for k, vector in hits.items():
        expected = [float(any(i in r for i in row[:k])) for row, r in zip(ranked.tolist(), relevant)]
        assert vector.tolist() == expected
    assert 0 < hits[10].mean() < 1  # the data exercises both outcomes


def test_item_to_item_ranking_leaves_the_query_item_out():
    catalogue = unit([0, 10, 25, 30])
    _, ranked = top_k(catalogue[[1, 3]], catalogue, k=3)
    assert ranked.tolist() == [[1, 0, 2], [3, 2, 1]]  # each query item ranks itself first
    assert without_self(ranked, [1, 3]).tolist() == [[0, 2], [2, 1]]
    assert without_self(ranked, [3, 0]).tolist() == [[1, 0], [3, 2]]  # not in the row: the last place goes
    hits = recall_at_k(without_self(ranked, [1, 3]), [{2}, {2}], ks=[1])
    assert hits[1].tolist() == [0.0, 1.0]


def test_recall_refuses_what_it_cannot_answer():
    ranked = np.array([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="only 2 columns"):
        recall_at_k(ranked, [{0}, {1}], ks=[3])
    with pytest.raises(ValueError, match="no relevant item"):
        recall_at_k(ranked, [{0}, set()], ks=[1])
    with pytest.raises(ValueError, match="2 ranked queries"):
        recall_at_k(ranked, [{0}], ks=[1])


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_the_mean_and_has_the_binomial_width():
    rng = np.random.default_rng(0)
    hits = (rng.random(400) < 0.5).astype(float)
    lo, hi = bootstrap_ci(hits, seed=1)
    assert lo < hits.mean() < hi
    expected = 2 * 1.96 * math.sqrt(hits.mean() * (1 - hits.mean()) / hits.size)  # about 0.098
    assert 0.8 * expected < hi - lo < 1.2 * expected
    narrow = bootstrap_ci(hits, seed=1, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


def test_bootstrap_is_seeded():
    hits = (np.random.default_rng(5).random(97) < 0.3).astype(float)
    assert bootstrap_ci(hits, seed=11) == bootstrap_ci(hits, seed=11)
    assert bootstrap_ci(hits, seed=11) != bootstrap_ci(hits, seed=12)


def test_bootstrap_collapses_when_every_query_agrees():
    assert bootstrap_ci(np.ones(50), seed=0) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(50), seed=0) == (0.0, 0.0)
    assert bootstrap_ci(np.full(33, 0.1), seed=0) == (0.1, 0.1)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.array([]), seed=0)


# ---------------------------------------------------------------- relevance


CATALOGUE_ITEMS = ["a1", "a2", "b1", "a3", "c1"]
CATALOGUE_SPUS = ["A", "A", "B", "A", "C"]


def test_item_hits_and_spu_hits():
    assert relevant_items(["a2", "c1"], ["A", "C"], CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=False) == [[1], [4]]
    assert relevant_items(["a2", "c1"], ["A", "C"], CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=True) == [[0, 1, 3], [4]]
    # Without SPU ids, item hits still work; pyarrow columns are accepted as they come from a table.
    assert relevant_items(pa.array(["b1"]), None, pa.chunked_array([CATALOGUE_ITEMS]), None, spu_hit=False) == [[2]]

    # The photo lands nearest a sibling SKU (a1) of the purchased a2: a miss by item, a hit by SPU.
    catalogue = unit([0, 40, 90, 20, 180])  # a1, a2, b1, a3, c1
    queries = unit([-5])
    for spu_hit, expected in ((False, 0.0), (True, 1.0)):
        relevant = relevant_items(["a2"], ["A"], CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=spu_hit)
        report = retrieval_recall(queries, catalogue, relevant, ks=[1, 2, 3])
        assert report.recall[2][1].value == expected
        assert report.recall[2][3].value == 1.0  # a2 (40 degrees) is third


def test_missing_target_is_a_data_error_that_names_it():
    with pytest.raises(CatalogueMismatch, match="'zz9'") as caught:
        relevant_items(["a1", "zz9"], ["A", "Z"], CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=True)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, UserError)
    with pytest.raises(CatalogueMismatch, match="'a1' has SPU 'B'"):
        relevant_items(["a1"], ["B"], CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=False)
    with pytest.raises(ValueError, match="'a1' appears more than once"):
        relevant_items(["a1"], None, ["a1", "b1", "a1"], None, spu_hit=False)
    with pytest.raises(ValueError, match="needs catalogue_spu_ids"):
        relevant_items(["a1"], None, CATALOGUE_ITEMS, None, spu_hit=True)


# ---------------------------------------------------------------- the report


def test_report_is_json_with_every_dim_and_k():
    rng = np.random.default_rng(2)
    catalogue = rng.normal(size=(60, 8)).astype(np.float32)
    targets = rng.integers(0, 60, size=40)
    queries = catalogue[targets] + rng.normal(scale=0.8, size=(40, 8)).astype(np.float32)
    report = retrieval_recall(queries, catalogue, [{int(t)} for t in targets], ks=(1, 10, 100), dims=(4, None), seed=3)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["queries"] == 40 and data["catalogue"] == 60
    assert data["bootstrap"] == {"method": "percentile", "level": 0.95, "resamples": 1000, "seed": 3}
    assert set(data["dims"]) == {"4", "8"}
    for by_k in data["dims"].values():
        assert set(by_k) == {"recall@1", "recall@10", "recall@100"}
        assert by_k["recall@100"] == {"value": 1.0, "ci95": [1.0, 1.0]}  # K beyond the catalogue ranks all of it
        for metric in by_k.values():
            lo, hi = metric["ci95"]
            assert 0.0 <= lo <= metric["value"] <= hi <= 1.0
        assert by_k["recall@1"]["value"] <= by_k["recall@10"]["value"]
    # The figures are the means of the kept per-query hits, searched at that dimension.
    _, ranked = top_k(queries, catalogue, 10, dim=4)
    expected = (ranked == targets[:, None]).any(axis=1).mean()
    assert data["dims"]["4"]["recall@10"]["value"] == pytest.approx(expected)
    assert report.hits[4][10].mean() == pytest.approx(expected)
    assert 0 < expected < 1
    again = retrieval_recall(queries, catalogue, [{int(t)} for t in targets], ks=(1, 10, 100), dims=(4, None), seed=3)
    assert again.to_dict() == report.to_dict()


def test_report_rejects_relevant_indices_outside_the_catalogue():
    with pytest.raises(ValueError, match="outside the catalogue"):
        retrieval_recall(unit([0]), unit([0, 90]), [{2}], ks=[1])


# ---------------------------------------------------------------- text search and item -> item


def test_a_query_with_several_targets_hits_when_any_is_found_and_spu_siblings_count_only_with_spu_hit():
    # Catalogue a1, a2, b1, a3, c1 (SPUs A, A, B, A, C). Query 0's session engaged with b1 and c1;
    # query 1's with a2 only.
    groups = [["c1", "b1"], ["a2"]]
    assert relevant_sets(groups, CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=False) == [[2, 4], [1]]
    assert relevant_sets(groups, CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=True) == [[2, 4], [0, 1, 3]]
    assert relevant_sets([["a1", "a3"]], CATALOGUE_ITEMS, None, spu_hit=False) == [[0, 3]]

    catalogue = unit([0, 40, 90, 20, 180])  # a1, a2, b1, a3, c1
    queries = unit([85, -5])  # query 0 lands on b1 (its second target); query 1 on a1, a sibling of a2
    by_item = retrieval_recall(queries, catalogue, relevant_sets(groups, CATALOGUE_ITEMS, CATALOGUE_SPUS, False), ks=[1, 3])
    by_spu = retrieval_recall(queries, catalogue, relevant_sets(groups, CATALOGUE_ITEMS, CATALOGUE_SPUS, True), ks=[1, 3])
    assert by_item.hits[2][1].tolist() == [1.0, 0.0]
    assert by_spu.hits[2][1].tolist() == [1.0, 1.0]
    assert by_item.hits[2][3].tolist() == [1.0, 1.0]  # a2 (40 degrees) is third from -5
    with pytest.raises(CatalogueMismatch, match="'zz9'"):
        relevant_sets([["a1"], ["zz9"]], CATALOGUE_ITEMS, CATALOGUE_SPUS, spu_hit=False)


def test_item_to_item_recall_leaves_the_query_item_out_of_its_ranking_and_its_relevant_set():
    # Items at 0, 10, 25, 30, 90 degrees. Query item 1 (10 degrees) led to item 0; query item 3
    # (30 degrees) led to item 4 (90 degrees, fourth after itself, 25 and 10).
    catalogue = unit([0, 10, 25, 30, 90])
    own = [1, 3]
    relevant = [[0], [4]]
    plain = retrieval_recall(catalogue[own], catalogue, relevant, ks=[1, 3, 4])
    assert plain.hits[2][1].tolist() == [0.0, 0.0]  # each item finds itself first
    report = retrieval_recall(catalogue[own], catalogue, relevant, ks=[1, 3, 4], exclude=own)
    assert report.hits[2][1].tolist() == [1.0, 0.0]  # 0 degrees is nearest to 10 once 10 is gone
    assert report.hits[2][3].tolist() == [1.0, 0.0]  # 25, 10, 0 degrees come before 90
    assert report.hits[2][4].tolist() == [1.0, 1.0]  # K = catalogue - 1 ranks every other item
    assert retrieval_recall(catalogue[own], catalogue, relevant, ks=[100], exclude=own).recall[2][100].value == 1.0

    # With SPU hits an item's own SPU may hold the query item: it is not a hit by itself.
    siblings = [[0, 1], [3, 4]]  # item 1 and item 0 share an SPU; so do items 3 and 4
    report = retrieval_recall(catalogue[own], catalogue, siblings, ks=[1], exclude=own)
    assert report.hits[2][1].tolist() == [1.0, 0.0]  # item 3's nearest other item is 25 degrees, not 90
    with pytest.raises(ValueError, match="no relevant item"):
        retrieval_recall(catalogue[own], catalogue, [[1], [4]], ks=[1], exclude=own)  # only itself
    with pytest.raises(ValueError, match="excluded rows"):
        retrieval_recall(catalogue[own], catalogue, relevant, ks=[1], exclude=[1])


def test_held_out_queries_are_test_split_sessions_of_both_pair_tables(tmp_path):
    def pairs(rows):
        n = len(rows)
        columns = dict(zip(("split", "query_view", "session_id", "query_text", "query_item_id", "pos_item_id"),
                           zip(*rows)))
        return pa.table({
            **{name: pa.array(list(values), pa.string()) for name, values in columns.items()},
            "task": pa.array([f"{r[1]}->richer-text+image" for r in rows]), "query_image": pa.nulls(n, pa.binary()),
            "pos_spu_id": pa.array(columns["pos_item_id"]), "item_view": pa.array(["richer-text+image"] * n),
            "hard_neg_item_ids": pa.array([[]] * n, pa.list_(pa.string())), "action": pa.array(["click"] * n),
            "weight": pa.array([1.0] * n, pa.float32()), "ts": pa.array([0] * n, schema.TIMESTAMP),
            "region": pa.array(["r"] * n), "user_id": pa.array(["u"] * n),
        })

    stage1 = [
        ("test", "text", "s2", "red dress", None, "i3"),
        ("test", "text", "s1", "blue shoe", None, "i1"),
        ("test", "text", "s1", "blue shoe", None, "i2"),
        ("train", "text", "s0", "green hat", None, "i4"),  # training days: never evaluated
        ("test", "image", "s3", None, None, "i5"),  # a photo query: the image-search set covers it
        ("test", "title+image", "s1", None, "i1", "i2"),
        ("test", "richer-text+image", "s1", None, "i1", "i3"),
        ("valid", "richer-text+image", "s4", None, "i2", "i3"),
    ]
    stage2 = [("test", "text", "s1", "blue shoe", None, "i2"), ("test", "text", "s5", "blue shoe", None, "i9")]
    for name, rows in (("pairs_stage1", stage1), ("pairs_stage2", stage2)):
        with TableWriter(tmp_path, name, schema.PAIRS) as writer:
            writer.write(pairs(rows))
            writer.commit()

    texts = held_out(tmp_path, ("text",), "query_text")
    assert texts.queries == ["blue shoe", "red dress", "blue shoe"]  # sessions s1, s2, s5
    assert texts.targets == [["i1", "i2"], ["i3"], ["i9"]]
    items = held_out(tmp_path, ITEM_QUERY_VIEWS, "query_item_id")
    assert (items.queries, items.targets) == (["i1"], [["i2", "i3"]])
    assert len(held_out(tmp_path / "empty", ("text",), "query_text")) == 0
    valid = held_out(tmp_path, ITEM_QUERY_VIEWS, "query_item_id", "valid")  # where recipes are chosen
    assert (valid.queries, valid.targets) == (["i2"], [["i3"]])


def test_paired_differences_read_two_models_on_the_same_queries():
    from moon.eval.retrieval import paired_differences

    reference = {"image_search": {10: np.array([1, 0, 0, 1, 0, 0, 1, 0] * 25, dtype=bool)}}
    better = {"image_search": {10: np.array([1, 1, 0, 1, 0, 1, 1, 0] * 25, dtype=bool)},
              "text_search": {10: np.ones(5, dtype=bool)}}  # no reference for it: no difference
    paired = paired_differences(better, reference, seed=0)
    entry = paired["image_search"]["recall@10"]
    assert set(paired) == {"image_search"} and entry["queries"] == 200
    assert entry["delta"] == pytest.approx(0.25)
    assert 0 < entry["ci95"][0] < 0.25 < entry["ci95"][1] <= 0.5  # the gain is resolved: the interval excludes 0
    same = paired_differences(reference, reference, seed=0)["image_search"]["recall@10"]
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0]
