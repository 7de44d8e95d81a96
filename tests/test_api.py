"""The Python API (`moon.load`): the README's example runs as written; texts, images (paths, bytes,
PIL images) and catalogue items encode as `moon embed` encodes them; a Matryoshka dim is the
re-normalised prefix; search by text, image, vector and item id ranks a store version's items by
cosine similarity, through its saved index or an exact one when the index lags; and each mistake
is a UserError that says how to fix it."""

import io
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import moon
from conftest import STORE_ITEMS, store_config, write_items
from moon import api, ui
from moon.api import Hit, load
from moon.errors import UserError
from moon.io.schema import ITEM_VIEWS
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.views import ItemViews
from moon.represent import embed_catalogue
from moon.run import RunDir
from moon.store.indexing import index_version, is_current
from moon.store.versions import Store
from moon.vectors import prefix
from moon.views import item_text

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = ["red summer dress", "blue denim jacket for men", "leather boots", "wool scarf", "black running shoes"]


def publish_model(run_dir: Path, stage: str, seed: int) -> None:
    """An untrained tiny embedder that shows items by their image alone: an item's own image then
    gives the very vector the store holds for it."""
    from moon.train.loop import publish

    settings = store_config("model.served_view=image").model
    embedder = Embedder.create(settings, ItemViews(read_table(run_dir, "items")).texts(), seed=seed)
    publish(embedder.save, RunDir(run_dir).model(stage), {"stage": stage})


@pytest.fixture(scope="module")
def run_dir(tiny_world, tmp_path_factory):
    """The first STORE_ITEMS items of the tiny world (the rest arrive "later"); untrained tiny models
    as pretrain (seed 1) and stage 2 (seed 0); store version v1-stage2 with its saved index, and
    v2-random, a newer version made by another model (64 dims). Tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("api") / "run"
    write_items(run, read_table(tiny_world, "items").slice(0, STORE_ITEMS))
    publish_model(run, "pretrain", seed=1)
    publish_model(run, "stage2", seed=0)
    embed_catalogue(store_config(), run)
    index_version(run)
    embed_catalogue(store_config(), run, model="random")
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    return load(run_dir)


@pytest.fixture(scope="module")
def items(run_dir):
    return read_table(run_dir, "items", columns=["item_id", "spu_id", "title", "category", "attributes", "image"])


def same_spu(items, row: int) -> set[str]:
    """The item of `row` and its SKU siblings (a size variant shares its image)."""
    spus = items["spu_id"].to_pylist()
    return {item_id for item_id, spu in zip(items["item_id"].to_pylist(), spus) if spu == spus[row]}


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_example_runs_on_a_tiny_run(run_dir, items, tmp_path, monkeypatch):
    code = readme_example()
    assert len(code.strip().splitlines()) == 5
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(run_dir)
    (tmp_path / "photo.jpg").write_bytes(items["image"][7].as_py())  # a catalogue image as the shopper's photo
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)

    model, vector, hits, similar = (namespace[name] for name in ("model", "vector", "hits", "similar"))
    assert model.path.resolve() == RunDir(run_dir).model("stage2").resolve()  # the latest trained stage
    assert vector.shape == (model.dim,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)
    assert len(hits) == 10 and all(isinstance(hit, Hit) for hit in hits)
    assert len({hit.item_id for hit in hits}) == 10
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert similar[0].item_id in same_spu(items, 7) and similar[0].score > 0.99


def test_import_moon_does_not_import_torch():
    code = "import sys, moon; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert moon.load is api.load


def test_an_image_path_its_bytes_and_a_pil_image_encode_alike(model, items, tmp_path):
    data = items["image"][3].as_py()
    path = tmp_path / "item.img"
    path.write_bytes(data)
    by_path, by_name, by_bytes, by_pil = model.encode(images=[path, str(path), data, Image.open(io.BytesIO(data))])
    for other in (by_name, by_bytes, by_pil):
        np.testing.assert_allclose(other, by_path, atol=1e-6)
    # the image view of the item shows the same pixels; another item's image gives another vector
    np.testing.assert_allclose(model.encode(items=items["item_id"][3].as_py(), view="image"), by_bytes, atol=1e-5)
    assert np.abs(model.encode(images=items["image"][4].as_py()) - by_bytes).max() > 1e-3


def test_texts_encode_in_batches_and_chunks_as_one_by_one(model, monkeypatch):
    monkeypatch.setattr(api, "CHUNK", 2)  # chunks of 2 inputs, batches of 2: every row placed by offset
    batched = model.encode(TEXTS, batch_size=2)
    assert batched.shape == (len(TEXTS), model.dim) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(batched, np.stack([model.encode(text) for text in TEXTS]), atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3
    assert model.encode([]).shape == (0, model.dim)


def test_items_encode_as_the_store_holds_them_in_any_view(model, items):
    ids = items["item_id"].to_pylist()
    chosen = [ids[5], ids[0], ids[5], ids[42]]  # any order, repeats allowed
    stored = model.store_version()
    np.testing.assert_allclose(model.encode(items=chosen), stored.lookup(chosen), atol=2e-3)  # float16 store

    views = {view: model.encode(items=chosen[:2], view=view) for view in ITEM_VIEWS}
    assert all(np.abs(views[a] - views[b]).max() > 1e-3 for a in ITEM_VIEWS for b in ITEM_VIEWS if a < b)
    row = 5
    text = item_text(items["title"][row].as_py(), items["category"][row].as_py(), items["attributes"][row].as_py(),
                     "richer-text")
    np.testing.assert_allclose(views["richer-text"][0], model.encode(text), atol=1e-5)


def test_a_matryoshka_dim_is_the_renormalised_prefix(model, items):
    assert model.dims == [16, 32]
    small = model.encode(TEXTS, dim=16)
    assert small.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(small, prefix(model.encode(TEXTS), 16), atol=1e-6)
    image = items["image"][0].as_py()
    np.testing.assert_allclose(model.encode(images=[image], dim=16), prefix(model.encode(images=[image]), 16),
                               atol=1e-6)


def test_search_by_text_ranks_the_versions_items_by_cosine(model):
    hits = model.search(text=TEXTS[0], k=7)
    stored = model.store_version()
    scores = stored.vectors() @ model.encode(TEXTS[0])
    np.testing.assert_allclose([hit.score for hit in hits], np.sort(scores)[::-1][:7], atol=1e-5)
    np.testing.assert_allclose([scores[stored.rows([hit.item_id])[0]] for hit in hits],
                               [hit.score for hit in hits], atol=1e-5)
    assert len(model.search(text=TEXTS[0], k=1000)) == len(stored)  # k beyond the catalogue: every item


def test_search_at_a_matryoshka_dim_ranks_by_the_prefix(model, items):
    query = model.encode(items=items["item_id"][9].as_py(), dim=16)
    hits = model.search(vector=query, k=5, dim=16)  # no index saved at 16 dims: an exact one in memory
    scores = model.store_version().vectors(16) @ query
    np.testing.assert_allclose([hit.score for hit in hits], np.sort(scores)[::-1][:5], atol=1e-5)
    assert hits[0].item_id in same_spu(items, 9)
    full = model.encode(items=items["item_id"][9].as_py())  # a full vector is cut to its prefix
    assert [hit.item_id for hit in model.search(vector=full, k=5, dim=16)] == [hit.item_id for hit in hits]


def test_search_by_item_id_leaves_the_item_out(model, items):
    item = items["item_id"][10].as_py()
    by_id = model.search(item_id=item, k=5)
    by_vector = model.search(vector=model.store_version().lookup([item])[0], k=6)
    assert by_vector[0].item_id in same_spu(items, 10) and by_vector[0].score > 0.999
    assert item not in {hit.item_id for hit in by_id} and len(by_id) == 5
    assert [hit.item_id for hit in by_id] == [hit.item_id for hit in by_vector if hit.item_id != item][:5]
    assert len(model.search(item_id=item, k=1000)) == len(items) - 1


def test_search_by_image_finds_the_item_pictured(model, items):
    for row in (0, 50, 120):
        hit = model.search(image=Image.open(io.BytesIO(items["image"][row].as_py())), k=1)[0]
        assert hit.item_id in same_spu(items, row) and hit.score > 0.99


def test_the_default_version_is_the_newest_the_model_made(run_dir, model, items):
    assert Store(run_dir).versions() == ["v1-stage2", "v2-random"]
    assert model.store_version().name == "v1-stage2"  # not the newer v2-random
    random_hits = model.search(item_id=items["item_id"][0].as_py(), version="v2-random", k=3)
    assert len(random_hits) == 3 and random_hits != model.search(item_id=items["item_id"][0].as_py(), k=3)

    other = load(run_dir, stage="pretrain")  # it made no version: the newest one is searched
    assert other.store_version().name == "v2-random"
    with pytest.raises(UserError, match=r"64-dim vectors of random, this model makes 32-dim .*moon embed"):
        other.search(text=TEXTS[0])
    with pytest.warns(UserWarning, match="v1-stage2 was made by another model"):
        other.search(text=TEXTS[0], version="v1-stage2")


def test_a_model_directory_loads_inside_its_run_or_anywhere(run_dir, model, tmp_path):
    inside = load(RunDir(run_dir).model("stage2"))
    assert inside.run_dir == run_dir.resolve()
    assert inside.search(text=TEXTS[1]) == model.search(text=TEXTS[1])

    copy = tmp_path / "published"
    shutil.copytree(RunDir(run_dir).model("stage2"), copy)
    alone = load(copy)
    assert alone.run_dir is None
    np.testing.assert_allclose(alone.encode(TEXTS), model.encode(TEXTS), atol=1e-6)
    with pytest.raises(UserError, match=r"loaded without a run.*run_dir="):
        alone.search(text=TEXTS[0])
    with pytest.raises(UserError, match=r"loaded without a run, so there is nothing to encode catalogue items"):
        alone.encode(items=["sku00000001"])
    attached = load(copy, run_dir=run_dir)  # the same weights, wherever they live: v1-stage2 is theirs
    assert attached.store_version().name == "v1-stage2"


def test_the_saved_index_is_searched_once_loaded(run_dir, monkeypatch):
    loaded, real = [], api.load_index

    def recording(run, version, dim):
        loaded.append((version, dim))
        return real(run, version, dim)

    monkeypatch.setattr(api, "load_index", recording)
    fresh = load(run_dir)
    fresh.search(text=TEXTS[0])
    fresh.search(text=TEXTS[1])
    assert loaded == [("v1-stage2", 32)]  # read once, then kept
    fresh.search(text=TEXTS[0], dim=16)  # none saved at 16 dims: an exact one, built in memory
    assert loaded == [("v1-stage2", 32), ("v1-stage2", 16)]


def test_search_sees_items_added_after_the_index_was_saved(run_dir, tiny_world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    write_items(run, read_table(tiny_world, "items"))  # 40 items launched since
    embed_catalogue(store_config(), run, version="v1-stage2", incremental=True)
    assert not is_current(run, "v1-stage2")  # the saved index lacks them
    everything = read_table(run, "items", columns=["item_id", "spu_id", "image"])
    new = everything.num_rows - 1
    grown = load(run)
    hit = grown.search(image=everything["image"][new].as_py(), k=1)[0]
    assert hit.item_id in same_spu(everything, new)
    assert len(grown.search(item_id=everything["item_id"][new].as_py(), k=1000)) == everything.num_rows - 1


def test_a_progress_bar_is_drawn_only_when_asked(model, monkeypatch):
    drawn = []

    @contextmanager
    def recording(description, total, unit="items"):
        done = []
        yield done.append
        drawn.append((description, total, unit, sum(done)))

    monkeypatch.setattr(ui, "progress", recording)
    model.encode(TEXTS, batch_size=2)
    assert drawn == []
    model.encode(TEXTS, batch_size=2, show_progress_bar=True)
    assert drawn == [("encode texts", len(TEXTS), "texts", len(TEXTS))]


def test_a_run_without_a_trained_model_says_how_to_get_one(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RunDir(run_dir).table("items"), RunDir(run).table("items"))
    with pytest.raises(UserError, match=r"has no trained model.*moon posttrain --stage 1.*model directory"):
        load(run)
    with pytest.raises(UserError, match=r"does not exist: pass a run directory"):
        load(tmp_path / "nowhere")


def test_a_missing_or_unknown_stage_says_what_there_is(run_dir):
    with pytest.raises(UserError, match=r"no stage1 model \(trained: pretrain, stage2\).*moon posttrain --stage 1"):
        load(run_dir, stage="stage1")
    with pytest.raises(UserError, match=r"stage='stage3' is not a model stage: use one of pretrain, stage1, stage2"):
        load(run_dir, stage="stage3")
    with pytest.raises(UserError, match=r"model directory, which holds one model"):
        load(RunDir(run_dir).model("stage2"), stage="stage2")


def test_an_unknown_version_lists_the_finished_ones(model):
    with pytest.raises(UserError, match=r"v9-stage2 does not exist; finished versions: v1-stage2, v2-random: "
                                        r"pass one of those as version="):
        model.search(text=TEXTS[0], version="v9-stage2")


def test_an_unknown_item_id_says_where_ids_come_from(model, items):
    with pytest.raises(UserError, match=r"1 item id\(s\) are not in the catalogue .*'sku-nope'.*item_id column"):
        model.encode(items=[items["item_id"][0].as_py(), "sku-nope"])
    with pytest.raises(UserError, match=rf"'sku-nope' is not in store version v1-stage2 \({STORE_ITEMS} items\): "
                                        r"check the id"):
        model.search(item_id="sku-nope")


def test_an_item_newer_than_the_version_says_how_to_add_it(run_dir, tiny_world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    write_items(run, read_table(tiny_world, "items"))
    newest = read_table(run, "items", columns=["item_id"])["item_id"][-1].as_py()
    with pytest.raises(UserError, match=r"came after the version: run `moon embed --incremental`"):
        load(run).search(item_id=newest)


def test_a_wrong_dim_names_the_dims_there_are(model, items):
    with pytest.raises(UserError, match=r"dim=7 is not a dimension of this model: use one of \[16, 32\]"):
        model.encode(TEXTS, dim=7)
    with pytest.raises(UserError, match=r"dim=7 is not a dimension of store version v1-stage2: use one of \[16, 32\]"):
        model.search(text=TEXTS[0], dim=7)
    with pytest.raises(UserError, match=r"the vector has 16 dims, but store version v1-stage2 is searched at "
                                        r"dim=32: pass dim=16"):
        model.search(vector=model.encode(TEXTS[0], dim=16))


def test_an_image_that_cannot_be_decoded_is_named_by_its_position(model, items, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "CHUNK", 2)  # the position counts across chunks
    good = items["image"][0].as_py()
    with pytest.raises(UserError, match=r"image 3 \(12 bytes\) cannot be decoded .*pass an image PIL reads"):
        model.encode(images=[good, good, good, b"not an image"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[: len(good) // 3])  # a file cut short
    with pytest.raises(UserError, match=rf"image 0 \({re.escape(str(broken))}\) cannot be decoded"):
        model.search(image=broken)
    with pytest.raises(UserError, match=r"image 0: .*missing.jpg is not a file"):
        model.encode(images=str(tmp_path / "missing.jpg"))
    with pytest.raises(UserError, match=r"image 1 is a int: pass a file path, encoded bytes or a PIL image"):
        model.encode(images=[good, 12345])


@pytest.mark.parametrize("call, message", [
    (lambda m: m.encode(), r"pass exactly one of texts=, images=, items= \(got none\)"),
    (lambda m: m.search(text="dress", item_id="sku00000001"), r"exactly one of .*\(got text=, item_id=\)"),
    (lambda m: m.encode(TEXTS, view="image"), r"view='image' applies to items"),
    (lambda m: m.encode(items=["sku00000001"], view="photo"), r"view='photo' is not an item view: use one of"),
    (lambda m: m.encode(["dress", 2]), r"text 1 is a int, not a string"),
    (lambda m: m.encode(items=["sku00000001", None]), r"item id 1 is a NoneType, not a string"),
    (lambda m: m.encode(TEXTS, batch_size=0), r"batch_size=0 must be a positive integer"),
    (lambda m: m.search(text="dress", k=0), r"k=0 must be a positive integer"),
    (lambda m: m.search(text=["a", "b"]), r"text= takes one query"),
])
def test_other_mistakes_say_what_to_pass(model, call, message):
    with pytest.raises(UserError, match=message):
        call(model)
