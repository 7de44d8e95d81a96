import json

import faiss
import numpy as np
import pytest

from moon.errors import UserError
from moon.store import index as index_module
from moon.store.index import VectorIndex, VectorIndexError, ann_recall, build_per_dim, choose_kind, pq_codes


def clustered(n, dim, centres=100, noise=0.5, seed=0):
    """Unnormalised vectors around random unit centres, the shape real embeddings have."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (x * rng.uniform(0.5, 3.0, size=(n, 1))).astype(np.float32)


def names(n, start=0):
    return np.array([f"item-{i}" for i in range(start, start + n)])


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin while they wait: on a busy two-core machine one thread is many times faster."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 32), names(4000)


@pytest.fixture(scope="module")
def built(data):
    x, ids = data
    return {kind: VectorIndex.build(x, ids, kind=kind, seed=0) for kind in ("exact", "hnsw", "ivfpq")}


def brute_force(queries, vectors, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ v.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


# ---------------------------------------------------------------- search


def test_exact_search_matches_brute_force_on_unnormalised_vectors(data, built):
    x, ids = data
    queries = clustered(50, 32, seed=1)
    scores, found = built["exact"].search(queries, 10)
    want_scores, want_rows = brute_force(queries, x, 10)
    assert scores.dtype == np.float32 and scores.shape == found.shape == (50, 10)
    np.testing.assert_array_equal(found, ids[want_rows])
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_search_leaves_the_callers_queries_unchanged(built):
    queries = clustered(5, 32, seed=2)
    before = queries.copy()
    built["exact"].search(queries, 3)
    np.testing.assert_array_equal(queries, before)


def test_k_above_size_gives_one_column_per_item():
    x, ids = clustered(7, 8), names(7)
    scores, found = VectorIndex.build(x, ids).search(x[:2], 50)
    assert found.shape == scores.shape == (2, 7)
    assert sorted(found[0]) == sorted(ids)


def test_unfilled_places_hold_empty_id_and_minus_infinity(data, monkeypatch):
    monkeypatch.setattr(index_module, "IVF_NPROBE", 1)  # one inverted list holds far fewer than k items
    x, ids = data
    ivf = VectorIndex.build(x, ids, kind="ivfpq")
    scores, found = ivf.search(x[:4], ivf.size)
    unfilled = found == ""
    assert unfilled.any() and (~unfilled).any()
    assert np.isneginf(scores[unfilled]).all() and np.isfinite(scores[~unfilled]).all()


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_k_must_be_a_positive_integer(built, k):
    with pytest.raises(VectorIndexError, match="positive integer"):
        built["exact"].search(clustered(2, 32), k)


# ---------------------------------------------------------------- approximate kinds and recall


def test_ann_recall_of_exact_is_one_and_of_approximate_kinds_is_high(data, built):
    x, _ = data
    assert ann_recall(built["exact"], x, sample=300) == 1.0
    assert ann_recall(built["hnsw"], x, sample=300) > 0.8
    assert ann_recall(built["ivfpq"], x, sample=300) > 0.5


def test_ann_recall_is_seeded_and_needs_every_indexed_vector(data, built):
    x, _ = data
    assert ann_recall(built["ivfpq"], x, sample=100, seed=3) == ann_recall(built["ivfpq"], x, sample=100, seed=3)
    with pytest.raises(VectorIndexError, match="every vector the index holds"):
        ann_recall(built["hnsw"], x[:100])


def test_build_records_the_parameters_of_each_kind(built):
    assert built["exact"].params == {}
    assert built["hnsw"].params == {"M": 32, "ef_construction": 80, "ef_search": 64}
    ivf = built["ivfpq"].params
    assert 32 % ivf["m"] == 0 and ivf["nprobe"] <= ivf["nlist"] <= 4000 // 39


def test_pq_codes_divide_the_width():
    assert [pq_codes(d) for d in (32, 64, 128, 768, 1024, 30, 7)] == [8, 16, 32, 64, 64, 6, 1]


def test_ivfpq_refuses_too_few_vectors_to_train():
    with pytest.raises(VectorIndexError, match="kind='exact'"):
        VectorIndex.build(clustered(100, 16), names(100), kind="ivfpq")


def test_auto_picks_exact_then_hnsw_then_ivfpq_by_size(monkeypatch):
    assert choose_kind(index_module.EXACT_UP_TO) == "exact"
    assert choose_kind(index_module.EXACT_UP_TO + 1) == "hnsw"
    assert choose_kind(index_module.HNSW_UP_TO + 1) == "ivfpq"
    monkeypatch.setattr(index_module, "EXACT_UP_TO", 100)
    monkeypatch.setattr(index_module, "HNSW_UP_TO", 1500)
    kinds = {n: VectorIndex.build(clustered(n, 16), names(n)).kind for n in (100, 101, 1500, 1501)}
    assert kinds == {100: "exact", 101: "hnsw", 1500: "hnsw", 1501: "ivfpq"}


def test_unknown_kind_is_refused():
    with pytest.raises(VectorIndexError, match="auto, exact, hnsw, ivfpq"):
        VectorIndex.build(clustered(10, 8), names(10), kind="flat")


# ---------------------------------------------------------------- save and load


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_save_load_round_trip_returns_identical_results(built, kind, tmp_path):
    index = built[kind]
    queries = clustered(40, 32, seed=4)
    saved = index.save(tmp_path / "index")
    loaded = VectorIndex.load(saved)
    assert (loaded.kind, loaded.size, loaded.dim, loaded.params) == (index.kind, index.size, index.dim, index.params)
    for got, want in zip(loaded.search(queries, 10), index.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    meta = json.loads((saved / "index.json").read_text())
    assert (meta["kind"], meta["dim"], meta["size"]) == (kind, 32, 4000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folder left behind


def test_save_replaces_a_saved_index_but_not_other_folders(tmp_path):
    small, smaller = VectorIndex.build(clustered(20, 8), names(20)), VectorIndex.build(clustered(5, 8), names(5))
    small.save(tmp_path / "index")
    smaller.save(tmp_path / "index")
    assert VectorIndex.load(tmp_path / "index").size == 5
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(VectorIndexError, match="not a saved vector index"):
        small.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "notes"]


def test_load_of_a_folder_without_an_index_says_so(tmp_path):
    with pytest.raises(VectorIndexError, match="VectorIndex.save"):
        VectorIndex.load(tmp_path)


# ---------------------------------------------------------------- incremental add


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_added_items_are_found_after_save_and_load(kind, tmp_path):
    x, ids = clustered(1000, 32, seed=5), names(1000)
    VectorIndex.build(x, ids, kind=kind).save(tmp_path / "index")
    index = VectorIndex.load(tmp_path / "index")
    new = clustered(30, 32, seed=6)
    index.add(new, names(30, start=1000))
    assert index.size == 1030 and list(index.ids[-2:]) == ["item-1028", "item-1029"]
    _, found = index.search(new, 1)
    np.testing.assert_array_equal(found[:, 0], names(30, start=1000))
    _, found = index.search(x[:20], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:20])


def test_add_to_ivfpq_encodes_with_the_trained_codebooks(data):
    x, ids = data
    index = VectorIndex.build(x[:3000], ids[:3000], kind="ivfpq")
    index.add(x[3000:], ids[3000:])
    assert index.size == 4000
    assert ann_recall(index, x, sample=200) > 0.5


def test_longer_new_ids_are_kept_whole():
    index = VectorIndex.build(clustered(10, 8), names(10))
    long_id = "item-with-a-much-longer-identifier"
    vector = clustered(1, 8, seed=9)
    index.add(vector, [long_id])
    assert index.search(vector, 1)[1][0, 0] == long_id
    with pytest.raises(VectorIndexError, match="already in the index"):
        index.add(vector, [long_id])


def test_duplicate_ids_are_refused_and_leave_the_index_unchanged():
    x, ids = clustered(50, 8), names(50)
    with pytest.raises(VectorIndexError, match="'item-3' appears more than once"):
        VectorIndex.build(x, np.concatenate([ids[:49], ids[3:4]]))
    index = VectorIndex.build(x, ids)
    with pytest.raises(VectorIndexError, match="already in the index, e.g. 'item-7'"):
        index.add(clustered(2, 8, seed=1), ["item-new", "item-7"])
    with pytest.raises(VectorIndexError, match="new ids must be unique"):
        index.add(clustered(2, 8, seed=1), ["item-new", "item-new"])
    assert index.size == 50
    index.add(clustered(1, 8, seed=1), ["item-new"])
    assert index.size == 51


def test_adding_nothing_is_a_no_op():
    index = VectorIndex.build(clustered(5, 8), names(5))
    index.add(np.empty((0, 8), np.float32), [])
    assert index.size == 5


# ---------------------------------------------------------------- bad input


def test_wrong_width_is_refused_with_the_expected_width(built):
    with pytest.raises(VectorIndexError, match="have 16 dims but the index holds 32-dim vectors"):
        built["exact"].search(clustered(3, 16), 5)
    with pytest.raises(VectorIndexError, match="vectors\\[:, :32\\]"):
        built["hnsw"].add(clustered(3, 64), names(3, start=9000))


@pytest.mark.parametrize(
    ("vectors", "ids", "message"),
    [
        (np.array([[1.0, np.nan], [1.0, 0.0]]), ["a", "b"], "NaN or infinite values in 1 row\\(s\\) \\(first: row 0"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), ["a", "b"], "all zeros \\(first: row 1\\)"),
        (np.ones((3, 2)), ["a", "b"], "2 ids for 3 vectors"),
        (np.ones(4), ["a"], "2-D \\(rows, dim\\)"),
        (np.ones((2, 2)), [1, 2], "ids.astype\\(str\\)"),
        (np.ones((2, 2)), ["a", ""], "row 1 is ''"),
        (np.empty((0, 2)), [], "no vectors to index"),
    ],
)
def test_bad_input_is_refused_with_what_is_wrong(vectors, ids, message):
    with pytest.raises(VectorIndexError, match=message):
        VectorIndex.build(vectors, ids)


def test_errors_are_value_errors_the_cli_reports():
    with pytest.raises(ValueError) as raised:
        VectorIndex.build(np.ones((2, 2)), ["a"])
    assert isinstance(raised.value, UserError)


# ---------------------------------------------------------------- Matryoshka


def test_build_per_dim_indexes_renormalised_prefixes(data):
    x, ids = data
    indexes = build_per_dim(x, ids, dims=[8, 16, None, 16])
    assert sorted(indexes) == [8, 16, 32] and indexes[16].dim == 16
    queries = clustered(20, 32, seed=7)
    _, found = indexes[16].search(queries[:, :16], 5)
    _, want_rows = brute_force(queries[:, :16], x[:, :16], 5)
    np.testing.assert_array_equal(found, ids[want_rows])
    with pytest.raises(VectorIndexError, match="must lie in 1..32"):
        build_per_dim(x, ids, dims=[64])
