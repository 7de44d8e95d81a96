"""The CTR stage: samples and side tables, behaviour strictly before each sample, representation
tables from store versions, the three models, training with reuse, evaluation."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from conftest import TINY_WORLD
from moon.config import load_config
from moon.ctr.data import OOV, CtrData
from moon.ctr.features import load_spec
from moon.ctr.models import MODELS
from moon.ctr.representations import RepresentationTable, resolve_version
from moon.ctr.samples import build_samples
from moon.errors import UserError
from moon.io.tables import read_manifest, read_table
from moon.queries import query_ids
from moon.report import ctr as ctr_report
from moon.run import RunDir

FAST = ["ctr.seeds=[0]", "ctr.max_epochs=2", "ctr.batch_size=128", "ctr.hidden=[16]", "ctr.embedding_dim=8",
        "ctr.max_len=12", "ctr.query_max_len=6", "ctr.dim=16", "ctr.representations=random"]


def ctr_config(*overrides):
    return load_config(None, [*TINY_WORLD, "name=tiny", *FAST, *overrides])


@pytest.fixture(scope="module")
def ctr_world(tiny_world, tmp_path_factory):
    """The tiny world with CTR samples and a placebo (random) store version; tests copy it before changing it."""
    from moon.represent import embed_catalogue

    run_dir = tmp_path_factory.mktemp("ctr-world")
    for table in ("items", "events", "item_truth"):
        shutil.copytree(RunDir(tiny_world).table(table), RunDir(run_dir).table(table))
    build_samples(ctr_config(), run_dir)
    embed_catalogue(ctr_config(), run_dir, model="random")
    return run_dir


def test_samples_are_the_impressions_labelled_by_clicks(ctr_world):
    events = read_table(ctr_world, "events", ["session_id", "item_id", "action"])
    samples = read_table(ctr_world, "ctr_samples")
    impressions = events.filter(pc.equal(events["action"], "impression"))
    assert samples.num_rows == impressions.num_rows
    clicks = events.filter(pc.equal(events["action"], "click"))
    clicked = set(zip(clicks["session_id"].to_pylist(), clicks["item_id"].to_pylist()))
    labels = [int((r, i) in clicked) for r, i in zip(samples["request_id"].to_pylist(), samples["item_id"].to_pylist())]
    assert samples["label"].to_pylist() == labels and 0 < sum(labels) < len(labels)


def test_splits_follow_the_pairs_days_and_the_manifest_names_the_test_days(ctr_world):
    config = ctr_config()
    manifest = read_manifest(ctr_world, "ctr_samples")
    days = read_manifest(ctr_world, "events")["days"]
    assert len(manifest["days"]["test"]) == config.pairs.test_days
    assert len(manifest["days"]["valid"]) == config.pairs.valid_days
    assert len(manifest["days"]["train"]) == days - config.pairs.test_days - config.pairs.valid_days
    samples = read_table(ctr_world, "ctr_samples", ["day", "split"])
    test_days = set(pc.unique(samples.filter(pc.equal(samples["split"], "test"))["day"]).to_pylist())
    assert test_days == set(range(days - config.pairs.test_days, days))


def test_no_sample_sees_its_own_click_or_anything_later(ctr_world):
    """Every looked-up behaviour is strictly before the sample, and all of it is there up to max_len."""
    data = CtrData.load(ctr_world, load_spec(ctr_config()))
    samples = read_table(ctr_world, "ctr_samples")
    behaviour = read_table(ctr_world, "ctr_behaviour")
    sample_ts = samples["ts"].cast(pa.int64()).to_numpy()
    users, times = behaviour["user_id"].to_numpy(zero_copy_only=False), behaviour["ts"].cast(pa.int64()).to_numpy()
    items = np.array(data.item_ids, dtype=object)
    rows = np.arange(len(sample_ts))
    history, mask = data.behaviour.gather(rows, 10_000)
    sample_users = samples["user_id"].to_numpy(zero_copy_only=False)
    checked_clicks = 0
    for row in range(0, len(rows), 7):
        mine = (users == sample_users[row]) & (times < sample_ts[row])
        expected = sorted(zip(times[mine], behaviour["item_id"].to_numpy(zero_copy_only=False)[mine]))
        seen = items[history["item_row"][row][mask[row]] - 1].tolist()
        assert len(seen) == len(expected)
        assert sorted(seen) == sorted(item for _, item in expected)
        if samples["label"][row].as_py() == 1:
            own = (users == sample_users[row]) & (times >= sample_ts[row])
            assert own.any()  # its click is in the side table, later than the impression...
            checked_clicks += 1
    assert checked_clicks > 0
    assert (data.behaviour.end <= data.behaviour.end.max()).all()


def test_sequences_are_cut_to_the_latest_events(ctr_world):
    data = CtrData.load(ctr_world, load_spec(ctr_config()))
    longest = int(np.argmax(data.behaviour.lengths()))
    full, full_mask = data.behaviour.gather(np.array([longest]), 10_000)
    cut, cut_mask = data.behaviour.gather(np.array([longest]), 3)
    assert cut_mask.all() and full_mask.sum() > 3
    assert cut["item_row"][0].tolist() == full["item_row"][0][full_mask[0]][-3:].tolist()


def test_items_unseen_in_training_are_out_of_vocabulary_but_keep_their_representation(ctr_world):
    config = ctr_config()
    spec = load_spec(config, "random")
    data = CtrData.load(ctr_world, spec)
    samples = read_table(ctr_world, "ctr_samples", ["item_id", "split"])
    trained = set(samples.filter(pc.equal(samples["split"], "train"))["item_id"].to_pylist())
    unseen = [row + 1 for row, item in enumerate(data.item_ids) if item not in trained]
    assert unseen and (data.items["item_id"][unseen] == OOV).all()
    table = RepresentationTable.load(resolve_version(ctr_world, "random"), data.item_ids, "item_id", 16)
    assert table.present[unseen].all() and table.vectors[unseen].abs().sum() > 0


def test_a_version_lacking_items_gives_zero_rows_flagged_missing_and_incremental_items_appear(ctr_world, tmp_path):
    from moon.store.versions import Store

    version = resolve_version(ctr_world, "random")
    keys = version.ids()[:5] + ["never-embedded"]
    table = RepresentationTable.load(version, keys, "item_id", 16)
    assert table.present.tolist() == [False, True, True, True, True, True, False]
    assert float(table.vectors[6].abs().sum()) == 0 and float(table.vectors[0].abs().sum()) == 0
    copy = tmp_path / "run"
    shutil.copytree(ctr_world, copy)
    stored = Store(copy).open(version.name)
    stored.add(["never-embedded"], np.eye(1, stored.dim, dtype=np.float32))
    reloaded = RepresentationTable.load(resolve_version(copy, version.name), keys, "item_id", 16)
    assert bool(reloaded.present[6]) and float(reloaded.vectors[6, 0]) == pytest.approx(1.0, abs=1e-2)


def test_query_representations_are_looked_up_by_query_id(ctr_world):
    version = resolve_version(ctr_world, "random")
    data = CtrData.load(ctr_world, load_spec(ctr_config()))
    table = RepresentationTable.load(version, data.query_ids, "query_id", 16)
    assert table.coverage == 1.0
    events = read_table(ctr_world, "events", ["query_text", "query_image"]).slice(0, 5)
    ids = query_ids(events["query_text"], events["query_image"]).to_pylist()
    rows = [data.query_ids.index(q) + 1 for q in ids]
    assert table.dim == version.dim  # a control version has no Matryoshka prefix: its full width serves
    expected = version.vectors(of="queries")[version.rows(ids, of="queries")]
    assert np.allclose(table.vectors[rows].float().numpy(), expected, atol=1e-2)


def test_cube_branches_change_what_the_model_reads(ctr_world):
    from moon.ctr.train import representation_tables

    config = ctr_config()
    spec = load_spec(config, "random")
    data = CtrData.load(ctr_world, spec)
    tables = representation_tables(ctr_world, spec, data)
    batch = data.batch(np.arange(32), config.ctr.max_len, config.ctr.query_max_len)
    widths = {}
    for name in ("dnn", "din", "cube"):
        model = MODELS[name](spec, data, config.ctr, tables)
        assert model(batch).shape == (32,)
        widths[name] = model.width()
    assert widths["dnn"] < widths["din"] < widths["cube"]
    lean = ctr_config("ctr.cube.content=false", "ctr.cube.fusion=false", "ctr.cube.query_sequence=false",
                      "ctr.cube.query_similarity=false")
    assert MODELS["cube"](spec, data, lean.ctr, tables).width() < widths["cube"]
    for part in ("content", "histogram"):
        assert MODELS["cube"](spec, data, ctr_config(f"ctr.cube.{part}=false").ctr, tables).width() < widths["cube"]
    for part in ("fusion", "query_sequence"):
        assert MODELS["cube"](spec, data, ctr_config(f"ctr.cube.{part}=true").ctr, tables).width() > widths["cube"]


def test_top_k_reads_only_the_behaviours_most_similar_to_the_target(ctr_world):
    """With ctr.top_k=K CUBE (its ID attention included) reads K behaviours: changing one outside
    them changes nothing, changing one of them changes the prediction."""
    from moon.ctr.train import representation_tables

    config = ctr_config("ctr.top_k=2", "ctr.cube.query_sequence=false")
    spec = load_spec(config, "random")
    data = CtrData.load(ctr_world, spec)
    tables = representation_tables(ctr_world, spec, data)
    _, distinct = data.behaviour.gather_distinct(np.arange(len(data.behaviour.end)), config.ctr.max_len, "item_row",
                                                 "action")
    rows = np.flatnonzero(distinct.sum(1) >= 3)[:16]  # three different items or more: no ties in the top 2
    batch = data.batch(rows, config.ctr.max_len, config.ctr.query_max_len, distinct_items=True)
    torch.manual_seed(0)
    cube = MODELS["cube"](spec, data, config.ctr, tables).eval()
    target = cube.items_mm(batch["item_row"])
    kept_rows, _, mask = cube.behaviour(batch, target)
    assert kept_rows.shape[1] == 2 and mask.all()
    scores = torch.einsum("bd,bld->bl", target, cube.items_mm(batch["behaviour_rows"]))
    every = torch.arange(len(rows))

    def without(position: torch.Tensor) -> dict:
        """The batch with one behaviour per sample removed."""
        out = {key: value.clone() for key, value in batch.items()}
        out["behaviour_rows"][every, position], out["behaviour_mask"][every, position] = 0, False
        return out

    with torch.no_grad():
        base = cube(batch)
        least = scores.masked_fill(~batch["behaviour_mask"], float("inf")).argmin(1)
        most = scores.masked_fill(~batch["behaviour_mask"], float("-inf")).argmax(1)
        assert torch.allclose(cube(without(least)), base, atol=1e-6)
        assert not torch.allclose(cube(without(most)), base, atol=1e-6)


def test_distinct_items_keep_each_item_once_at_its_latest_time_with_its_strongest_action():
    from moon.ctr.data import Sequences

    # one user's events in time order: item rows and action codes (click 2 < cart 3 < purchase 4)
    items = np.array([5, 7, 5, 9, 7, 7, 3, 8, 8, 8])
    actions = np.array([2, 2, 3, 2, 4, 2, 2, 2, 3, 4])
    events = Sequences({"item_row": items, "action": actions}, start=np.array([0, 0, 0, 6]), end=np.array([10, 6, 0, 10]),
                       users=np.zeros(10, np.int64))
    seen, mask = events.gather_distinct(np.arange(4), 3, "item_row", "action")
    assert seen["item_row"].tolist() == [[7, 3, 8], [5, 9, 7], [0, 0, 0], [0, 3, 8]]
    assert seen["action"].tolist() == [[4, 2, 4], [3, 2, 4], [0, 0, 0], [0, 2, 4]]
    assert mask.tolist() == [[True] * 3, [True] * 3, [False] * 3, [False, True, True]]


def test_distinct_sequences_match_the_history_read_by_hand(ctr_world):
    """The latest 4 distinct items among the latest 16 events (DISTINCT_WINDOW x 4), each with the
    strongest action of all its events before the sample; and the strongest past action on the
    sample's own item, over the whole history."""
    data = CtrData.load(ctr_world, load_spec(ctr_config()))
    rows = np.flatnonzero(data.behaviour.lengths() > 0)[::5]
    seen, mask = data.behaviour.gather_distinct(rows, 4, "item_row", "action")
    full, full_mask = data.behaviour.gather(rows, 10_000)
    repeated = own = 0
    for i in range(len(rows)):
        history = list(zip(full["item_row"][i][full_mask[i]], full["action"][i][full_mask[i]]))
        repeated += len(history) > len({item for item, _ in history})
        latest = {}
        for position, (item, _) in enumerate(history[-16:]):
            latest[item] = position
        expected = sorted(latest, key=latest.get)[-4:]
        assert seen["item_row"][i][mask[i]].tolist() == expected
        strongest = [max(a for it, a in history if it == item) for item in expected]
        assert seen["action"][i][mask[i]].tolist() == strongest
        target = data.samples["item_row"][rows[i]]
        assert data.samples["own_action"][rows[i]] == max([a for it, a in history if it == target], default=0)
        own += data.samples["own_action"][rows[i]] > 0
    assert repeated > 0 and own > 0  # the tiny world's shoppers do act on one item more than once


def test_softmax_pooling_follows_the_target_and_the_histogram_counts_bands():
    from moon.config import CubeBranches
    from moon.ctr.layers import ContentInterest

    torch.manual_seed(0)
    basis = torch.eye(4)
    target = basis[:1]  # (1, 4)
    behaviour = torch.stack([basis[0], basis[1], basis[2], basis[3] * 0]).unsqueeze(0)  # the last is padding
    mask = torch.tensor([[True, True, True, False]])
    softmax = ContentInterest(4, 3, CubeBranches(pooling="softmax"), None)
    softmax.log_temperature.data.fill_(np.log(0.01))
    content, mean, largest, shares = softmax(target, behaviour, mask)
    assert torch.allclose(content, softmax.project(basis[:1]), atol=1e-4)  # all weight on the matching behaviour
    assert mean.item() == pytest.approx(1 / 3) and largest.item() == 1.0
    assert shares.sum().item() == pytest.approx(1.0) and shares.shape == (1, 10)
    cosine = ContentInterest(4, 3, CubeBranches(pooling="cosine"), None)
    content = cosine(target, behaviour, mask)[0]
    assert torch.allclose(content, cosine.project(basis[:1] / 3), atol=1e-5)  # the paper's s_b, averaged
    empty = softmax(target, behaviour, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.allclose(empty[0], softmax.project(torch.zeros(1, 4))) and empty[-1].sum() == 0

    softmax.fit_bands(torch.ones(64, 1), torch.linspace(-1, 1, 64).view(64, 1, 1), torch.ones(64, 1, dtype=torch.bool))
    assert torch.allclose(softmax.edges, torch.quantile(torch.linspace(-1, 1, 64), torch.linspace(0, 1, 11)[1:-1]))


def test_training_reuses_runs_names_the_version_and_switching_versions_keeps_the_samples(ctr_world, tmp_path):
    from moon.ctr.evaluate import evaluate
    from moon.ctr.train import RESULT, WEIGHTS, train
    from moon.represent import embed_catalogue

    run = tmp_path / "run"
    shutil.copytree(ctr_world, run)
    samples_made = read_manifest(run, "ctr_samples")["created_at"]
    folders = train(ctr_config(), run, ["din", "cube"])
    result = json.loads((folders[1] / RESULT).read_text())
    version = resolve_version(run, "random").name
    assert result["representations"]["item_id"]["version"] == version
    assert torch.load(folders[1] / WEIGHTS)["representations"]["item_id"]["version"] == version
    assert not any("vectors" in key for key in torch.load(folders[1] / WEIGHTS)["state_dict"])
    stamp = (folders[1] / RESULT).stat().st_mtime_ns
    assert train(ctr_config(), run, ["cube"]) == [folders[1]] and (folders[1] / RESULT).stat().st_mtime_ns == stamp
    by_name = train(ctr_config(f"ctr.representations={version}"), run, ["cube"])  # the same version, named
    assert by_name == [folders[1]] and (folders[1] / RESULT).stat().st_mtime_ns == stamp

    embed_catalogue(ctr_config(), run, model="truth")
    switched = train(ctr_config("ctr.representations=truth"), run, ["cube"])[0]
    assert switched.parent != folders[1].parent
    assert json.loads((switched / RESULT).read_text())["representations"]["item_id"]["version"].endswith("truth")
    assert read_manifest(run, "ctr_samples")["created_at"] == samples_made

    results = evaluate(ctr_config(), run)
    assert results["base"] == "din" and len(results["models"]) == 3
    cube = next(m for name, m in results["models"].items() if name.startswith("cube@") and "truth" in name)
    assert "delta" in cube["lift"]["auc"] and "new items" in cube["segment_lift"]
    assert json.loads(RunDir(run).ctr_results.read_text())["test_rows"] == results["test_rows"]
    section = ctr_report.section(run)
    assert section.metrics["ctr"]["models"].keys() == results["models"].keys()
    assert section.body.count('data-kind="plot"') == 1 and "new items" in section.body

    # a store made anew names its first version v1 again: a run over the old v1 is not reused for it
    shutil.rmtree(RunDir(run).store)
    again = embed_catalogue(ctr_config(), run, model="random")
    assert again.name == version
    retrained = train(ctr_config(), run, ["cube"])[0]
    assert retrained.parent != folders[1].parent


def test_a_missing_version_is_a_clear_error(ctr_world):
    with pytest.raises(UserError, match="moon embed --model stage2"):
        resolve_version(ctr_world, "stage2")


def test_a_bad_feature_spec_says_what_is_wrong(tmp_path):
    spec = tmp_path / "features.yaml"
    spec.write_text("features:\n  - {name: colour, type: categorical, source: item}\n")
    with pytest.raises(UserError, match="not a known column"):
        load_spec(ctr_config(f"ctr.features={spec}"))


def test_target_attention_equals_din_s_concatenated_form():
    """The part-by-part first layer computes what DIN's MLP over [q, k, q-k, q*k, extra] computes."""
    from moon.ctr.layers import TargetAttention

    torch.manual_seed(0)
    attention = TargetAttention(8, [6, 4], extra=3)
    target, keys, extra = torch.randn(5, 8), torch.randn(5, 7, 8), torch.randn(5, 7, 3)
    mask = torch.rand(5, 7) > 0.3
    query = target.unsqueeze(1).expand_as(keys)
    scores = attention.rest(attention.first(torch.cat([query, keys, query - keys, query * keys, extra], -1)))
    weights = scores.squeeze(-1) * mask
    expected = (weights.unsqueeze(-1) * keys).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(attention(target, keys, mask.float(), extra), expected, atol=1e-6)


def test_training_under_torchrun_with_two_processes(ctr_world, tmp_path):
    """Two real gloo processes train DIN (each its slice of every batch) and rank 0 publishes one result,
    the model one process learns from the same global batches."""
    import subprocess
    import sys

    from conftest import free_port
    from moon.ctr.train import RESULT, train

    run = tmp_path / "run"
    shutil.copytree(ctr_world, run)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "moon", "ctr", "train", "--run-dir", str(run), "--quiet",
               "--model", "din", *TINY_WORLD, "name=tiny", *FAST]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = [json.loads(path.read_text()) for path in RunDir(run).ctr_models.glob(f"*/seed-*/{RESULT}")]
    assert len(results) == 1 and results[0]["processes"] == 2

    alone = tmp_path / "alone"
    shutil.copytree(ctr_world, alone)
    train(ctr_config(*FAST, "ctr.batch_size=256"), alone, ["din"])  # 2 x 128: the same global batches
    single = [json.loads(path.read_text()) for path in RunDir(alone).ctr_models.glob(f"*/seed-*/{RESULT}")]
    assert single[0]["processes"] == 1
    assert [epoch["valid_auc"] for epoch in results[0]["epochs"]] == pytest.approx(
        [epoch["valid_auc"] for epoch in single[0]["epochs"]], abs=2e-3)
