"""`moon serve`, a real uvicorn process on 127.0.0.1 over a tiny run: every route answers as the store
says (embeddings equal the stored vectors, scores equal cosines against the version that answered);
every bad input is a 4xx JSON message, after which the service still answers; versions switch under
load without one failed request, each response consistent with the version it names; items added
while serving are searchable at once, kept across a restart and carried into a newer version; admin
routes need the key, and a failed reload leaves the old version serving."""

import base64
import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import STORE_ITEMS, free_port, store_config, write_items
from moon.errors import UserError
from moon.io.tables import has_table, read_table
from moon.represent import embed_catalogue
from moon.serve.server import check_exposure, is_loopback
from moon.serve.state import Delta, Hit, Searchable, merge
from moon.store.index import VectorIndex
from moon.store.indexing import index_version
from moon.store.versions import Store, StoreVersion
from moon.views import item_text

KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
LIMITS = ["serve.max_inputs=8", "serve.queue_size=8", "serve.max_body_bytes=200000", "serve.max_image_bytes=60000",
          "serve.max_image_pixels=1000000", "serve.max_text_chars=300", "serve.max_k=50", "serve.batch_wait_ms=2",
          "serve.watch_interval=0.3"]
VERSIONS = ("v1-stage2", "v2-random", "v3-random")
ALL_ITEMS = 240  # the tiny world's catalogue: STORE_ITEMS in v1's saved index, the rest added after it


# ---------------------------------------------------------------- the run and the server


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """v1-stage2 (the untrained tiny stage-2 model) with its index saved over the first STORE_ITEMS items,
    then the other 40 added by `moon embed --incremental` (so only the delta holds them); v2-random and
    v3-random (seeds 0 and 1, 64 dims): versions whose vectors differ detectably from v1's and each other's."""
    from conftest import publish_untrained

    run_dir = tmp_path_factory.mktemp("serve") / "run"
    write_items(run_dir, read_table(tiny_world, "items").slice(0, STORE_ITEMS))
    publish_untrained(run_dir, "stage2", seed=0)
    embed_catalogue(store_config(), run_dir)
    index_version(run_dir)
    embed_catalogue(store_config(), run_dir, model="random")
    embed_catalogue(store_config("seed=1"), run_dir, model="random")
    write_items(run_dir, read_table(tiny_world, "items"))
    embed_catalogue(store_config(), run_dir, version="v1-stage2", incremental=True)
    assert Store(run_dir).versions() == list(VERSIONS)
    return run_dir


@pytest.fixture(scope="module")
def items(run):
    return read_table(run, "items", columns=["item_id", "title", "category", "attributes", "image"])


class Server:
    """`python -m moon serve` on a free loopback port, with the admin key set."""

    def __init__(self, run_dir: Path, log: Path):
        self.run_dir, self.log = run_dir, log
        self.process = None

    def start(self, *options: str) -> None:
        self.port = free_port()
        env = {**os.environ, "MOON_ADMIN_KEY": KEY, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "moon", "serve", "--run-dir", str(self.run_dir), "--port", str(self.port),
                   *options, *LIMITS]
        with self.log.open("a") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"moon serve exited: {self.log.read_text()[-3000:]}"
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"moon serve was not ready within 120s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()  # uvicorn shuts down gracefully, then ends by the signal it caught
        assert self.process.wait(timeout=30) in (0, -15), self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    served = Server(run, tmp_path_factory.mktemp("serve-log") / "serve.log")
    served.start()
    yield served
    if served.process.poll() is None:
        served.stop()


@pytest.fixture
def client(server):
    return server.client


def answered(response: httpx.Response, status: int = 200) -> dict:
    """The JSON body, after checking the status and that the header and the body name one version."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["version"] == response.headers["x-moon-version"], (body, response.headers)
    if status >= 400:
        assert set(body) == {"error", "version"} and body["error"]
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stored(run, version: str) -> tuple[dict[str, int], np.ndarray]:
    """(item id -> row, float32 unit vectors) of a version, as the store reads them."""
    version = StoreVersion(Store(run).path(version))
    return {item_id: row for row, item_id in enumerate(version.item_ids())}, version.vectors()


def served_view(items, row: int) -> dict:
    """An embed input showing a catalogue item as the tiny model serves items (richer text + image)."""
    text = item_text(items["title"][row].as_py(), items["category"][row].as_py(), items["attributes"][row].as_py(),
                     "richer-text+image")
    return {"text": text, "image": b64(items["image"][row].as_py())}


def embed(client, inputs: list[dict], dim: int | None = None) -> np.ndarray:
    return np.array(answered(client.post("/v1/embed", json={"inputs": inputs, "dim": dim}))["vectors"])


def top_scores(rows: dict, vectors: np.ndarray, query: np.ndarray, k: int, leave_out: str | None = None):
    scores = vectors @ query
    if leave_out is not None:
        scores[rows[leave_out]] = -np.inf
    return np.sort(scores)[::-1][:k]


# ---------------------------------------------------------------- routes


def test_health_readiness_versions_and_metrics(client, run):
    assert answered(client.get("/healthz")) == {"status": "alive", "version": "v1-stage2"}
    assert answered(client.get("/readyz"))["status"] == "ready"
    served = answered(client.get("/v1/versions"))
    assert (served["version"], served["model"], served["engine"]) == ("v1-stage2", "stage2", "faiss")
    assert (served["base_items"], served["delta_items"]) == (STORE_ITEMS, ALL_ITEMS - STORE_ITEMS)
    listed = {version["name"]: version for version in served["versions"]}
    assert list(listed) == list(VERSIONS)
    assert listed["v1-stage2"]["active"] and listed["v1-stage2"]["made_by_serving_model"]
    assert listed["v1-stage2"]["items"] == ALL_ITEMS and listed["v1-stage2"]["dims"] == [16, 32]
    assert not listed["v2-random"]["made_by_serving_model"] and listed["v2-random"]["dim"] == 64

    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["x-moon-version"] == "v1-stage2"
    text = metrics.text
    for name in ("moon_requests_total", "moon_request_duration_seconds_bucket", "moon_embed_queue_size",
                 "moon_embed_batch_size_bucket", 'moon_active_version_info{model="stage2",version="v1-stage2"} 1.0',
                 'moon_index_items{part="delta"} 40.0', 'route="/v1/versions",status="200"'):
        assert name in text, name


def test_the_openapi_page_describes_every_route_and_field(client):
    spec = client.get("/openapi.json").json()
    routes = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert routes >= {("POST", "/v1/embed"), ("POST", "/v1/search"), ("GET", "/v1/items/{item_id}/vector"),
                      ("POST", "/v1/lookup"), ("GET", "/v1/versions"), ("GET", "/healthz"), ("GET", "/readyz"),
                      ("GET", "/metrics"), ("POST", "/v1/admin/reload"), ("POST", "/v1/admin/items")}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert operation.get("description"), (method, path)
    schemas = spec["components"]["schemas"]
    for name in ("EmbedRequest", "EmbedInput", "SearchRequest", "LookupRequest", "ReloadRequest", "NewItem",
                 "SearchResponse", "LookupResponse"):
        for field, schema in schemas[name]["properties"].items():
            assert schema.get("description") or field in ("item_id", "title", "shop_id", "price", "dim"), (name, field)
    assert client.get("/docs").status_code == 200


def test_embeddings_equal_the_vectors_the_store_holds(client, run, items):
    rows, vectors = stored(run, "v1-stage2")
    picked = [0, 5, 199, 230]  # 230: added by `moon embed --incremental`
    got = embed(client, [served_view(items, row) for row in picked])
    expected = vectors[[rows[items["item_id"][row].as_py()] for row in picked]]
    np.testing.assert_allclose(got, expected, atol=2e-3)  # the store keeps float16
    small = embed(client, [served_view(items, row) for row in picked], dim=16)
    np.testing.assert_allclose(small, got[:, :16] / np.linalg.norm(got[:, :16], axis=1, keepdims=True), atol=1e-5)

    mixed = embed(client, [{"text": "red summer dress"}, {"image": b64(items["image"][3].as_py())},
                           {"text": "red summer dress", "image": b64(items["image"][3].as_py())}])
    assert mixed.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1, atol=1e-5)
    assert np.abs(mixed[0] - mixed[2]).max() > 1e-3 and np.abs(mixed[1] - mixed[2]).max() > 1e-3
    np.testing.assert_allclose(embed(client, [{"text": "red summer dress"}]), mixed[:1], atol=1e-5)  # batch-independent


def test_search_by_text_image_vector_and_item_rank_by_cosine(client, run, items):
    rows, vectors = stored(run, "v1-stage2")
    for query in ({"text": "blue denim jacket"}, {"image": b64(items["image"][7].as_py())}):
        vector = embed(client, [query])[0]
        found = answered(client.post("/v1/search", json={**query, "k": 7}))
        assert found["dim"] == 32 and len(found["hits"]) == 7
        scores = [hit["score"] for hit in found["hits"]]
        np.testing.assert_allclose(scores, top_scores(rows, vectors, vector, 7), atol=1e-4)
        np.testing.assert_allclose([vectors[rows[hit["item_id"]]] @ vector for hit in found["hits"]], scores, atol=1e-4)

    item = items["item_id"][12].as_py()
    by_item = answered(client.post("/v1/search", json={"item_id": item, "k": 5}))["hits"]
    assert item not in {hit["item_id"] for hit in by_item}
    np.testing.assert_allclose([hit["score"] for hit in by_item],
                               top_scores(rows, vectors, vectors[rows[item]], 5, leave_out=item), atol=1e-4)

    late = items["item_id"][235].as_py()  # only in the delta: the saved index predates it
    nearest = answered(client.post("/v1/search", json={"vector": vectors[rows[late]].tolist(), "k": 3}))["hits"][0]
    assert nearest["item_id"] == late and nearest["score"] > 0.999

    small = vectors[:, :16] / np.linalg.norm(vectors[:, :16], axis=1, keepdims=True)
    at_16 = answered(client.post("/v1/search", json={"vector": vectors[rows[late]].tolist(), "k": 4, "dim": 16}))
    assert at_16["dim"] == 16
    np.testing.assert_allclose([hit["score"] for hit in at_16["hits"]], top_scores(rows, small, small[rows[late]], 4),
                               atol=1e-4)


def test_a_category_filter_keeps_items_with_it_at_any_level(client, items):
    paths = dict(zip(items["item_id"].to_pylist(), items["category"].to_pylist()))
    root, leaf = paths[items["item_id"][0].as_py()][0], paths[items["item_id"][0].as_py()][-1]
    for category in (leaf, root):
        holding = {item_id for item_id, path in paths.items() if category in path}
        hits = answered(client.post("/v1/search", json={"text": "dress", "k": 50, "category": category}))["hits"]
        assert {hit["item_id"] for hit in hits} <= holding and len(hits) == min(50, len(holding))
    assert answered(client.post("/v1/search", json={"text": "dress", "category": "No such category"}))["hits"] == []


def test_lookup_and_item_vectors_are_the_stored_representation(client, run, items):
    rows, vectors = stored(run, "v1-stage2")
    asked = [items["item_id"][4].as_py(), "sku-nope", items["item_id"][238].as_py(), items["item_id"][4].as_py()]
    found = answered(client.post("/v1/lookup", json={"ids": asked}))
    assert found["found"] == [asked[0], asked[2], asked[3]] and found["missing"] == ["sku-nope"]
    np.testing.assert_allclose(found["vectors"], vectors[[rows[asked[0]], rows[asked[2]], rows[asked[3]]]], atol=1e-6)
    small = answered(client.post("/v1/lookup", json={"ids": asked[:1], "dim": 16}))
    prefix = vectors[rows[asked[0]], :16]
    np.testing.assert_allclose(small["vectors"][0], prefix / np.linalg.norm(prefix), atol=1e-6)
    one = answered(client.get(f"/v1/items/{asked[2]}/vector", params={"dim": 16}))
    assert (one["item_id"], one["dim"], len(one["vector"])) == (asked[2], 16, 16)


# ---------------------------------------------------------------- bad input


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(side: int) -> bytes:
    """The start of a side x side RGB PNG, up to its first pixel data: all a reader needs to tell its size."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(bytes(64)))


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a side x side RGB PNG of zeros, a few kilobytes that decode to megabytes."""
    pixels = zlib.compress(bytes(side * (1 + 3 * side)), 9)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_cut_short() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


JSON = {"content-type": "application/json"}
BAD_INPUTS = [
    # (name, method, path, request arguments, status, a piece of the message)
    ("malformed JSON", "POST", "/v1/search", {"content": b'{"text": "dress",', "headers": JSON}, 400, "not valid JSON"),
    ("JSON that is not an object", "POST", "/v1/search", {"json": ["dress"]}, 422, "body"),
    ("k not a number", "POST", "/v1/search", {"json": {"text": "dress", "k": "ten"}}, 422, "body.k"),
    ("unknown field", "POST", "/v1/search", {"json": {"txt": "dress"}}, 422, "body.txt: unknown field"),
    ("no query", "POST", "/v1/search", {"json": {"k": 3}}, 422, "exactly one of"),
    ("two queries", "POST", "/v1/search", {"json": {"text": "dress", "item_id": "sku00000001"}}, 422, "exactly one of"),
    ("k of 0", "POST", "/v1/search", {"json": {"text": "dress", "k": 0}}, 422, "k=0 must lie in 1..50"),
    ("k over serve.max_k", "POST", "/v1/search", {"json": {"text": "dress", "k": 51}}, 422, "serve.max_k"),
    ("bad base64", "POST", "/v1/search", {"json": {"image": "not*base64!"}}, 422, "not valid base64"),
    ("bytes that are no image", "POST", "/v1/embed", {"json": {"inputs": [{"image": b64(b"just some text")}]}}, 422,
     "not an image"),
    ("a JPEG cut short", "POST", "/v1/search", {"json": {"image": b64(jpeg_cut_short())}}, 422, "cannot be decoded"),
    ("an image over serve.max_image_bytes", "POST", "/v1/search", {"json": {"image": b64(noise_png(160))}}, 413,
     "serve.max_image_bytes"),
    ("a decompression bomb", "POST", "/v1/search", {"json": {"image": b64(bomb_png(3000))}}, 413,
     "3000x3000 = 9,000,000 pixels, over serve.max_image_pixels"),
    ("a header claiming 900M pixels", "POST", "/v1/embed", {"json": {"inputs": [{"image": b64(png_header(30000))}]}},
     413, "serve.max_image_pixels"),
    ("a text over serve.max_text_chars", "POST", "/v1/search", {"json": {"text": "x" * 301}}, 413,
     "301 characters, over serve.max_text_chars=300"),
    ("an empty text", "POST", "/v1/embed", {"json": {"inputs": [{"text": "  "}]}}, 422, "the text is empty"),
    ("an input with nothing", "POST", "/v1/embed", {"json": {"inputs": [{}]}}, 422, "give a text, an image"),
    ("too many inputs", "POST", "/v1/embed", {"json": {"inputs": [{"text": "a"}] * 9}}, 413, "serve.max_inputs=8"),
    ("no inputs", "POST", "/v1/embed", {"json": {"inputs": []}}, 422, "the list is empty"),
    ("too many lookup ids", "POST", "/v1/lookup", {"json": {"ids": ["a"] * 1001}}, 413, "serve.max_lookup_ids"),
    ("a body over serve.max_body_bytes", "POST", "/v1/search", {"json": {"text": "x" * 250_000}}, 413,
     "serve.max_body_bytes"),
    ("a chunked body over serve.max_body_bytes", "POST", "/v1/search",
     {"content": iter([b'{"text": "'] + [b"x" * 50_000] * 5 + [b'"}']), "headers": JSON}, 413, "serve.max_body_bytes"),
    ("an unknown item", "POST", "/v1/search", {"json": {"item_id": "sku-nope"}}, 404, "'sku-nope' is not in store"),
    ("an unknown item's vector", "GET", "/v1/items/sku-nope/vector", {}, 404, "'sku-nope' is not in store"),
    ("an embed dim the model lacks", "POST", "/v1/embed", {"json": {"inputs": [{"text": "a"}], "dim": 7}}, 422,
     "dim=7 is not a dimension of this model"),
    ("a search dim the version lacks", "POST", "/v1/search", {"json": {"text": "a", "dim": 7}}, 422,
     "dim=7 is not a dimension of store version v1-stage2"),
    ("a lookup dim the version lacks", "POST", "/v1/lookup", {"json": {"ids": ["sku00000001"], "dim": 64}}, 422,
     "dim=64"),
    ("a vector shorter than the dim", "POST", "/v1/search", {"json": {"vector": [0.1] * 16}}, 422,
     "the vector has 16 dims"),
    ("a vector of NaN", "POST", "/v1/search", {"content": b'{"vector": [NaN' + b", 1.0" * 31 + b"]}", "headers": JSON},
     422, "NaN"),
    ("a zero vector", "POST", "/v1/search", {"json": {"vector": [0.0] * 32}}, 422, "zero"),
    ("an unknown route", "GET", "/v2/search", {}, 404, "no route GET /v2/search"),
    ("a wrong method", "GET", "/v1/search", {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("name, method, path, arguments, status, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_json_message_and_the_service_still_answers(client, name, method, path, arguments, status,
                                                                     message):
    refused = answered(client.request(method, path, **arguments), status)
    assert message in refused["error"], refused["error"]
    assert answered(client.post("/v1/search", json={"text": "dress", "k": 2}))["hits"]


def test_a_full_embedding_queue_is_answered_429(client):
    batch = {"inputs": [{"text": f"red summer dress {i}"} for i in range(8)]}  # a whole serve.queue_size
    responses: list[httpx.Response] = []
    for _ in range(20):  # requests sent at once: while one is embedded, the others find the queue full
        def send(start: threading.Barrier) -> None:
            start.wait()
            responses.append(client.post("/v1/embed", json=batch))

        start = threading.Barrier(6)
        threads = [threading.Thread(target=send, args=(start,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if any(response.status_code == 429 for response in responses):
            break
    statuses = {response.status_code for response in responses}
    assert statuses == {200, 429}, statuses
    full = next(response for response in responses if response.status_code == 429)
    assert "serve.queue_size=8" in answered(full, 429)["error"] and full.headers["retry-after"] == "1"
    assert len(answered(client.post("/v1/embed", json=batch))["vectors"]) == 8  # the queue drains


# ---------------------------------------------------------------- admin


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}])
def test_admin_routes_need_the_key(client, headers):
    for path, body in (("/v1/admin/reload", {}), ("/v1/admin/items", {"items": []})):
        refused = client.post(path, json=body, headers=headers)
        assert "MOON_ADMIN_KEY" in answered(refused, 401)["error"]
        assert refused.headers["www-authenticate"] == "Bearer"
    assert answered(client.get("/v1/versions"))["version"] == "v1-stage2"


def test_a_failed_reload_keeps_the_old_version_serving(client, run):
    unknown = answered(client.post("/v1/admin/reload", json={"version": "v9-stage2"}, headers=ADMIN), 404)
    assert "v9-stage2" in unknown["error"] and "v1-stage2 keeps serving" in unknown["error"]

    broken = Store(run).path("v8-random")  # finished by its manifest, but a shard is not Parquet
    shutil.copytree(Store(run).path("v2-random"), broken)
    (broken / "part-00003.parquet").write_bytes(b"not parquet")
    try:
        failed = answered(client.post("/v1/admin/reload", json={"version": "v8-random"}, headers=ADMIN), 422)
        assert "v8-random could not be loaded" in failed["error"] and "v1-stage2 keeps serving" in failed["error"]
    finally:
        shutil.rmtree(broken)
    assert answered(client.get("/readyz"))["version"] == "v1-stage2"
    assert answered(client.post("/v1/search", json={"text": "dress"}))["version"] == "v1-stage2"
    assert 'moon_reloads_total{result="failed"} 2.0' in client.get("/metrics").text


def test_versions_switch_under_load_without_a_failed_request(server, run):
    """8 client threads search by item id while the main thread switches versions 5 times; every response
    must succeed, and its scores must be the cosines of the version it names (v1 has 32-dim model vectors,
    v2 and v3 64-dim random ones: a response mixing versions cannot pass)."""
    truth = {version: stored(run, version) for version in VERSIONS}
    queries = read_table(run, "items", columns=["item_id"])["item_id"].to_pylist()[:STORE_ITEMS]
    switches = ["v2-random", "v3-random", "v1-stage2", "v2-random", "v1-stage2"]
    responses, failures, stop = [], [], threading.Event()

    def search(thread: int) -> None:
        rng = np.random.default_rng(thread)
        with httpx.Client(base_url=server.client.base_url, timeout=30) as own:
            for _ in range(400):  # bounded even if the clock stalls
                if stop.is_set():
                    return
                item = queries[rng.integers(len(queries))]
                try:
                    response = own.post("/v1/search", json={"item_id": item, "k": 5})
                    responses.append((item, response.status_code, response.headers.get("x-moon-version"),
                                      response.json()))
                except Exception as exc:  # a dropped connection is a failure too
                    failures.append(repr(exc))

    threads = [threading.Thread(target=search, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    reloaded = []
    for version in switches:
        time.sleep(0.6)
        reloaded.append(answered(server.client.post("/v1/admin/reload", json={"version": version}, headers=ADMIN)))
    time.sleep(0.6)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)

    assert [done["version"] for done in reloaded] == switches
    assert failures == [] and len(responses) >= 100
    assert [status for _, status, _, _ in responses if status != 200] == []
    seen = {}
    for item, _, header, body in responses:
        assert body["version"] == header
        rows, vectors = truth[body["version"]]
        scores = [hit["score"] for hit in body["hits"]]
        np.testing.assert_allclose(scores, top_scores(rows, vectors, vectors[rows[item]], 5, leave_out=item),
                                   atol=1e-4, err_msg=f"{body['version']} {item}")
        np.testing.assert_allclose([vectors[rows[hit["item_id"]]] @ vectors[rows[item]] for hit in body["hits"]],
                                   scores, atol=1e-4)
        seen[body["version"]] = seen.get(body["version"], 0) + 1
    assert set(seen) == set(VERSIONS), seen
    print(f"\nload test: {len(responses)} searches, 0 failed, {len(switches)} switches, by version {seen}")
    assert answered(server.client.post("/v1/search", json={"item_id": queries[0]}))["version"] == "v1-stage2"


def test_one_reload_at_a_time(client):
    statuses: list[int] = []
    for _ in range(20):
        def reload(start: threading.Barrier) -> None:
            start.wait()
            statuses.append(client.post("/v1/admin/reload", json={"version": "v1-stage2"}, headers=ADMIN).status_code)

        start = threading.Barrier(4)
        threads = [threading.Thread(target=reload, args=(start,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if 409 in statuses:
            break
    assert 409 in statuses and 200 in statuses and set(statuses) <= {200, 409}


# ---------------------------------------------------------------- real-time items


NEW_ITEM = {"item_id": "rt-scarf-1", "title": "bright red silk scarf with a gold border",
            "category": ["Women", "Accessories", "Silk scarves"], "attributes": {"colour": "red"}}


def searched(client, vector, **options) -> list[dict]:
    return answered(client.post("/v1/search", json={"vector": list(vector), "k": 3, **options}))["hits"]


def test_a_new_item_is_searchable_at_once_and_kept(client, run, items):
    image = b64(items["image"][17].as_py())
    before = read_table(run, "served_items").num_rows if has_table(run, "served_items") else 0
    bad = {**NEW_ITEM, "item_id": "rt-broken", "image": b64(b"not an image")}
    assert "item 0 (rt-broken)" in answered(client.post("/v1/admin/items", json={"items": [bad]}, headers=ADMIN),
                                            422)["error"]

    started = time.monotonic()
    added = answered(client.post("/v1/admin/items", json={"items": [{**NEW_ITEM, "image": image}]}, headers=ADMIN))
    assert added["added"] == ["rt-scarf-1"] and added["items"] == ALL_ITEMS + 1
    vector = answered(client.get("/v1/items/rt-scarf-1/vector"))["vector"]
    hits = searched(client, vector)
    assert hits[0]["item_id"] == "rt-scarf-1" and hits[0]["score"] > 0.999
    assert time.monotonic() - started < 5
    assert [hit["item_id"] for hit in searched(client, vector, category="Silk scarves")] == ["rt-scarf-1"]
    shown = {"text": item_text(NEW_ITEM["title"], NEW_ITEM["category"], NEW_ITEM["attributes"], "richer-text+image"),
             "image": image}
    np.testing.assert_allclose(embed(client, [shown])[0], vector, atol=2e-3)  # embedded as catalogue items are

    kept = StoreVersion(Store(run).path("v1-stage2"))  # in the version, as `moon embed --incremental` adds items
    np.testing.assert_allclose(kept.lookup(["rt-scarf-1"])[0], vector, atol=1e-6)
    assert read_table(run, "served_items")["item_id"].to_pylist()[before:] == ["rt-scarf-1"]

    again = answered(client.post("/v1/admin/items", json={"items": [{**NEW_ITEM, "image": image}]}, headers=ADMIN), 409)
    assert "already in store version v1-stage2" in again["error"]
    answered(client.post("/v1/admin/reload", json={"version": "v2-random"}, headers=ADMIN))
    other = {**NEW_ITEM, "item_id": "rt-other", "image": image}
    assert "made by random" in answered(client.post("/v1/admin/items", json={"items": [other]}, headers=ADMIN),
                                        409)["error"]
    assert "made by random" in answered(client.post("/v1/search", json={"text": "scarf"}), 409)["error"]
    answered(client.post("/v1/admin/reload", headers=ADMIN))  # default: the newest version the model made
    assert answered(client.get("/v1/versions"))["version"] == "v1-stage2"
    assert read_table(run, "served_items")["item_id"].to_pylist()[before:] == ["rt-scarf-1"]


def test_after_a_restart_new_items_are_still_found_and_watch_follows_a_newer_version(server, run):
    server.stop()
    server.start("--version", "v1-stage2", "--watch")
    client = server.client
    vector = answered(client.get("/v1/items/rt-scarf-1/vector"))["vector"]
    hits = searched(client, vector, category="Silk scarves")
    assert hits[0]["item_id"] == "rt-scarf-1" and hits[0]["score"] > 0.999
    assert answered(client.get("/v1/versions"))["delta_items"] == ALL_ITEMS - STORE_ITEMS + 1

    embed_catalogue(store_config("store.partitions=4"), run)  # a newer version of the model, without the new item
    deadline = time.monotonic() + 30
    while answered(client.get("/v1/versions"))["version"] != "v4-stage2":
        assert time.monotonic() < deadline, "--watch did not switch to v4-stage2"
        time.sleep(0.2)
    hits = searched(client, vector)
    assert hits[0]["item_id"] == "rt-scarf-1" and hits[0]["score"] > 0.999
    assert answered(client.post("/v1/search", json={"vector": vector}))["version"] == "v4-stage2"
    assert "rt-scarf-1" in StoreVersion(Store(run).path("v4-stage2")).item_ids()  # caught up at load


# ---------------------------------------------------------------- without a server


def test_a_reachable_host_without_a_key_refuses_to_start(run):
    env = {key: value for key, value in os.environ.items() if key != "MOON_ADMIN_KEY"}
    done = subprocess.run([sys.executable, "-m", "moon", "serve", "--run-dir", str(run), "--host", "0.0.0.0",
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "set MOON_ADMIN_KEY" in done.stderr and "--no-admin" in done.stderr
    assert [is_loopback(host) for host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.5", "example.com")] \
        == [True, True, True, False, False, False]
    check_exposure("0.0.0.0", admin=False, key=None)
    check_exposure("0.0.0.0", admin=True, key="k")
    check_exposure("127.0.0.1", admin=True, key=None)
    with pytest.raises(UserError, match="MOON_ADMIN_KEY"):
        check_exposure("192.168.1.2", admin=True, key=None)


def test_the_delta_wins_over_the_base_on_a_duplicate_id():
    rng = np.random.default_rng(0)
    base_vectors = rng.normal(size=(5, 8)).astype(np.float32)
    base = VectorIndex.build(base_vectors, [f"b{i}" for i in range(5)], kind="exact")
    replacement = -base_vectors[2:3] / np.linalg.norm(base_vectors[2])  # b2, now pointing the other way
    delta = Delta(8, ["b2"], replacement)
    part = Searchable.make(base, delta, {})
    query = base_vectors[2:3] / np.linalg.norm(base_vectors[2])
    hits = part.search(query, 5)[0]
    assert [hit.item_id for hit in hits].count("b2") == 1 and len(hits) == 5
    assert hits[-1] == Hit("b2", pytest.approx(-1.0, abs=1e-5))
    assert merge([Hit("a", 0.9), Hit("b", 0.8)], [Hit("b", 0.5), Hit("c", 0.7)], 3, {"b": 0, "c": 1}) == [
        Hit("a", 0.9), Hit("c", 0.7), Hit("b", 0.5)]


def test_a_memory_mapped_index_searches_alike_and_refuses_writes(tmp_path):
    from moon.store.index import VectorIndexError

    vectors = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    built = VectorIndex.build(vectors, [f"i{n}" for n in range(50)], kind="exact")
    mapped = VectorIndex.load(built.save(tmp_path / "index"), mmap=True)
    for left, right in zip(built.search(vectors[:5], 4), mapped.search(vectors[:5], 4)):
        np.testing.assert_array_equal(left, right)
    with pytest.raises(VectorIndexError, match="memory-mapped"):  # faiss would abort the process instead
        mapped.add(vectors[:1], ["new"])


def test_the_micro_batcher_shares_passes_bounds_its_queue_and_isolates_a_failing_request():
    from moon.model.inputs import Input
    from moon.serve.batching import MicroBatcher, QueueFull

    passes, entered, release = [], threading.Event(), threading.Event()

    def encode(inputs):
        entered.set()
        release.wait(10)
        if any(one.text == "bad" for one in inputs):
            raise ValueError("the model cannot take this input")
        passes.append(len(inputs))
        return np.array([[float(one.text), 1.0] for one in inputs])

    batcher = MicroBatcher(encode, batch_size=6, batch_wait=0.05, queue_size=8)
    try:
        first = batcher.submit([Input("0"), Input("1")])
        assert entered.wait(10)  # the worker embeds it, and holds on until `release`
        queued = [batcher.submit([Input(str(10 * i)), Input(str(10 * i + 1))]) for i in (1, 2, 3)]
        with pytest.raises(QueueFull, match="serve.queue_size=8"):
            batcher.submit([Input("9")])
        release.set()
        assert first.result(10)[:, 0].tolist() == [0, 1]
        assert [future.result(10)[:, 0].tolist() for future in queued] == [[10, 11], [20, 21], [30, 31]]
        assert passes == [2, 6]  # three waiting requests, one forward pass
        good, bad = batcher.submit([Input("5")]), batcher.submit([Input("bad")])
        assert good.result(10)[:, 0].tolist() == [5]
        with pytest.raises(ValueError, match="cannot take"):
            bad.result(10)
        assert batcher.held == 0 and batcher.alive
    finally:
        release.set()
        batcher.close()
    assert not batcher.alive


def test_the_milvus_engine_says_what_it_needs(run, monkeypatch):
    from moon.serve.engines import open_engine

    assert open_engine("faiss", run) is None
    with pytest.raises(UserError, match="--engine milvus needs --milvus-uri"):
        open_engine("milvus", run)
    monkeypatch.setitem(sys.modules, "moon.store.milvus", None)  # as if the module were not there
    with pytest.raises(UserError, match="needs moon.store.milvus and pymilvus.*--engine faiss"):
        open_engine("milvus", run, "milvus.db")


def test_searches_through_milvus_name_the_version_that_answered(run, tmp_path):
    pytest.importorskip("moon.store.milvus", reason="moon.store.milvus is not in this checkout")
    pytest.importorskip("milvus_lite", reason="pymilvus and milvus-lite are installed by the dev extra")
    from moon.serve.engines import open_engine
    from moon.serve.state import load_state
    from moon.store.milvus import export_version

    uri = str(tmp_path / "milvus.db")
    export_version(run, "v3-random", uri)
    engine = open_engine("milvus", run, uri)
    try:
        state = load_state(run, Store(run).open("v3-random"), None, {})
        rows, vectors = stored(run, "v3-random")
        item = state.stored.ids[3]
        version, dim, hits = engine.search(state.vectors([item], 64)[2], 5, 64, state, None, leave_out=item)
        assert (version, dim) == ("v3-random", 64) and item not in {hit.item_id for hit in hits}
        np.testing.assert_allclose([hit.score for hit in hits],
                                   top_scores(rows, vectors, vectors[rows[item]], 5, leave_out=item), atol=1e-4)
    finally:
        engine.close()
