"""Post-training: stage 1 and stage 2 train and publish, a killed run resumes, and two real
torchrun processes train exactly as one process on the whole batch."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_MODEL, TINY_WORLD, free_port, publish_untrained
from moon.config import load_config
from moon.errors import UserError
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.inputs import prepared_ahead
from moon.model.views import ItemViews
from moon.pairs.build import build_pairs
from moon.run import RunDir
from moon.train import posttrain as recipe
from moon.train.augment import augment, cut_out
from moon.train.distill import NO_TARGET, DescriptorDistillation
from moon.train.loop import Processes, read_log

TRAIN = [
    *TINY_WORLD,
    *TINY_MODEL,
    "posttrain.from_pretrained=false",
    "posttrain.stage1.steps=4",
    "posttrain.stage1.batch_size=8",
    "posttrain.stage1.warmup_steps=1",
    "posttrain.stage1.checkpoint_every=2",
    "posttrain.stage1.log_every=1",
    "posttrain.stage1.catalogue_pairs=0.5",
    "posttrain.stage1.symmetric=true",
    "posttrain.stage2.steps=3",
    "posttrain.stage2.batch_size=4",
    "posttrain.stage2.warmup_steps=1",
    "posttrain.stage2.log_every=1",
    "posttrain.stage2.queue_size=16",
    "posttrain.stage2.hard_negatives=2",
    "posttrain.stage2.catalogue_pairs=0",
    "posttrain.stage2.chunk_size=3",
]


def config(*overrides):
    return load_config(None, [*TRAIN, "name=tiny", *overrides])


@pytest.fixture(scope="module")
def paired_world(tiny_world, tmp_path_factory):
    """The tiny world with its pair tables; tests copy it before training in it."""
    run_dir = tmp_path_factory.mktemp("paired")
    for table in ("items", "item_truth", "users", "events"):
        shutil.copytree(tiny_world / table, run_dir / table)
    build_pairs(config(), run_dir)
    return run_dir


@pytest.fixture
def run_dir(paired_world, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(paired_world, copy)
    return copy


def test_stage_two_needs_stage_one(run_dir):
    with pytest.raises(UserError, match="posttrain --stage 1"):
        recipe.posttrain(config(), run_dir, stage=2)


def test_stage_one_then_stage_two_train_with_every_negative_source(run_dir):
    first = recipe.posttrain(config(), run_dir, stage=1)
    second = recipe.posttrain(config(), run_dir, stage=2)
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["started_from"] == str(first) and manifest["config_digest"] == config().digest(*recipe.SECTIONS)

    log = read_log(RunDir(run_dir).work("stage2"))
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # in-batch (4) plus hard negatives (2 per pair) from step 1, plus the queue from step 2 on
    assert log[0]["negatives"] > 4 and log[2]["negatives"] > log[0]["negatives"]
    assert [r["queue"] for r in log] == [4, 8, 12]
    stage1_log = read_log(RunDir(run_dir).work("stage1"))
    assert all(r["negatives"] <= 7 for r in stage1_log)  # stage 1: in-batch only, same products masked
    assert all(r["distill_loss"] > 0 for r in stage1_log)


def test_photos_and_items_with_an_image_are_distilled_toward_the_item_pictured(run_dir):
    pairs = pair_table(run_dir, share=0.25, augment_size=32)
    batch = pairs.batch(np.arange(len(pairs))[None, :], 0, 0, np.random.default_rng(0))
    n = len(batch.queries)
    query_targets, positive_targets = batch.targets.distill_targets[:n].tolist(), batch.targets.distill_targets[n:].tolist()
    for i, (query, positive) in enumerate(zip(batch.queries, batch.positives)):
        pictured = int(batch.targets.positive_keys[i, 0])  # the positive item's catalogue row
        assert query_targets[i] == (pictured if query.text is None else NO_TARGET)
        assert positive_targets[i] == (pictured if positive.image is not None else NO_TARGET)
    assert NO_TARGET in query_targets and NO_TARGET in positive_targets  # text queries, text-only items


def test_distillation_teaches_an_embedding_to_name_its_item_by_descriptor():
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.rand(50, 12, generator=generator), dim=-1)
    distillation = DescriptorDistillation(prototypes, dim=16, temperature=0.02)
    embeddings = torch.nn.Parameter(torch.randn(6, 16, generator=generator))
    targets = torch.tensor([3, 17, NO_TARGET, 42, 0, NO_TARGET])
    optim = torch.optim.Adam([embeddings, *distillation.parameters()], lr=0.05)
    first = distillation(embeddings, targets).item()
    for _ in range(200):
        optim.zero_grad()
        distillation(embeddings, targets).backward()
        optim.step()
    assert distillation(embeddings, targets).item() < first / 10
    named = (distillation.head(embeddings.detach()) @ prototypes.T).argmax(1)
    assert named[targets != NO_TARGET].tolist() == [3, 17, 42, 0]
    assert embeddings.grad[2].abs().sum() == 0  # an embedding with no image is left alone
    nothing = distillation(embeddings, torch.full((6,), NO_TARGET))
    assert nothing.item() == 0 and nothing.requires_grad


def test_same_product_candidates_are_masked():
    positives = torch.tensor([[0, 10, 20], [1, 11, 21]])  # (item, SPU, group) of each query's positive
    candidates = torch.tensor([[0, 10, 20], [1, 11, 21], [5, 10, 25], [6, 16, 21], [7, 17, 27]])
    masked = recipe._same_product(positives, candidates)
    assert masked.tolist() == [[True, False, True, False, False], [False, True, False, True, False]]


def pair_table(run_dir, share=0.0, augment_size=None):
    items = ItemViews(read_table(run_dir, "items"))
    return recipe.PairTable(recipe.train_pairs(run_dir, 1), items, recipe.product_keys(run_dir, items), share,
                            augment_size)


def test_catalogue_self_pairs_find_their_own_item_from_an_augmented_image(run_dir):
    plain, mixed = pair_table(run_dir), pair_table(run_dir, share=0.25, augment_size=32)
    added = len(mixed) - len(plain)
    assert added == round(len(plain) / 3)  # a quarter of the whole
    rows = np.arange(len(plain), len(mixed))
    batch = mixed.batch(rows[None, :4], 0, 0, np.random.default_rng(0))
    assert batch.targets.tasks == [recipe.CATALOGUE_TASK] * 4
    assert batch.targets.positive_keys[:, 0].tolist() == [0, 1, 2, 3]  # the first items, each its own positive
    for query, positive in zip(batch.queries, batch.positives):
        assert query.text is None and query.image.size == (32, 32)
        assert positive.text and positive.image is not None  # the served richer-text+image view
    again = mixed.batch(rows[None, :4], 0, 0, np.random.default_rng(0))
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(batch.queries, again.queries))


def test_each_query_gets_the_same_augmentation_on_any_number_of_processes(run_dir):
    pairs = pair_table(run_dir, share=0.5, augment_size=32)
    indices = np.arange(len(pairs) - 6, len(pairs))
    whole = pairs.batch(indices[None, :], 0, 0, np.random.default_rng(7))
    ranks = [pairs.batch(indices.reshape(2, 3), rank, 0, np.random.default_rng(7)) for rank in (0, 1)]
    split = [query for batch in ranks for query in batch.queries]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(whole.queries, split))


def test_a_fraction_of_a_hard_negative_per_pair_is_a_chance_of_one(run_dir):
    items = ItemViews(read_table(run_dir, "items"))
    table = recipe.train_pairs(run_dir, 2)
    pairs = recipe.PairTable(table, items, recipe.product_keys(run_dir, items))
    with_hard = np.flatnonzero([len(rows) > 0 for rows in pairs.hard_rows])
    batch = pairs.batch(np.resize(with_hard, 400)[None, :], 0, 0.5, np.random.default_rng(0))
    assert 150 < len(batch.targets.hard_keys) < 250
    assert len(pairs.batch(with_hard[None, :3], 0, 2, np.random.default_rng(0)).targets.hard_keys) <= 6


def test_augmented_views_are_seeded_and_vary():
    image = Image.new("RGB", (96, 96), (200, 30, 30))
    image.paste((20, 20, 200), (30, 30, 66, 66))
    first, again = augment(image, np.random.default_rng(1), 48), augment(image, np.random.default_rng(1), 48)
    other = augment(image, np.random.default_rng(2), 48)
    assert first.size == (48, 48) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def _whitish_share(image):
    return float((np.asarray(image) > 200).all(-1).mean())


def test_catalogue_products_are_restaged_onto_shoppers_photos():
    product = Image.new("RGB", (96, 96), (255, 255, 255))  # a red product on a plain white background
    product.paste((200, 30, 30), (28, 20, 68, 76))
    cut = cut_out(product)
    assert cut.mode == "RGBA" and 40 <= cut.width <= 46 and 56 <= cut.height <= 62  # cropped to the product, edge feathered
    scene = Image.new("RGB", (96, 96), (40, 60, 160))  # a blue room
    buffer = io.BytesIO()
    scene.save(buffer, format="JPEG")
    restaged = [augment(product, np.random.default_rng(seed), 48, [buffer.getvalue()]) for seed in range(20)]
    plain = [augment(product, np.random.default_rng(seed), 48) for seed in range(20)]
    # The white catalogue background is gone behind the product; without scenes it stays.
    assert np.median([_whitish_share(image) for image in restaged]) < 0.02  # a fifth are left as they are
    assert np.median([_whitish_share(image) for image in plain]) > 0.2

    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    assert cut_out(noisy) is None  # no plain background to cut along: augmented as it is
    assert augment(noisy, np.random.default_rng(0), 48, [buffer.getvalue()]).size == (48, 48)


def test_without_spatial_negatives_one_process_trains_as_with_them(run_dir, tmp_path):
    """On one process a rank's own pairs are the whole batch: the same losses and weights, with
    hard negatives, the queue, GradCache chunks, distillation and the symmetric loss."""
    publish_untrained(run_dir, "stage1", seed=0)
    local_dir = tmp_path / "local"
    shutil.copytree(run_dir, local_dir)
    both = ["posttrain.stage2.distill_weight=1", "posttrain.stage2.symmetric=true"]
    spatial = recipe.posttrain(config(*both), run_dir, stage=2)
    local = recipe.posttrain(config(*both, "posttrain.stage2.spatial_negatives=false"), local_dir, stage=2)

    logs = [[{k: v for k, v in r.items() if k != "pairs_per_s"} for r in read_log(RunDir(d).work("stage2"))]
            for d in (run_dir, local_dir)]
    assert len(logs[0]) == 3 and logs[1] == logs[0]
    assert logs[0][2]["queue"] > 0 and "distill_loss" in logs[0][0]
    weights, expected = load_file(local / "model.safetensors"), load_file(spatial / "model.safetensors")
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key


def test_a_killed_run_resumes_to_the_same_weights(run_dir, tmp_path, monkeypatch):
    straight_dir = tmp_path / "straight"
    shutil.copytree(run_dir, straight_dir)
    straight = recipe.posttrain(config(), straight_dir, stage=1)

    real_call, calls = recipe.ContrastiveStep.__call__, []

    def killed_in_step_3(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint
        return real_call(self, *args)

    monkeypatch.setattr(recipe.ContrastiveStep, "__call__", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        recipe.posttrain(config(), run_dir, stage=1)
    assert not RunDir(run_dir).model("stage1").exists()  # nothing half-published
    calls.clear()
    resumed = recipe.posttrain(config(), run_dir, stage=1)
    assert len(calls) == 2  # steps 3 and 4 only

    weights, expected = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
    assert [r["step"] for r in read_log(RunDir(run_dir).work("stage1"))] == [1, 2, 3, 4]



def test_two_torchrun_processes_train_as_one_process_on_the_whole_batch(run_dir, tmp_path):
    """`torchrun -m moon posttrain`, 2 gloo ranks with half the batch each, spatial negatives,
    GradCache chunks, hard negatives and the queue: the same stage-2 weights as one process."""
    single_dir = tmp_path / "single"
    shutil.copytree(run_dir, single_dir)
    recipe.posttrain(config(), single_dir, stage=1)
    recipe.posttrain(config(), single_dir, stage=2)

    halves = ["posttrain.stage1.batch_size=4", "posttrain.stage2.batch_size=2"]
    for stage in ("1", "2"):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "moon", "posttrain", "--stage", stage, "--quiet", "--run-dir", str(run_dir),
            *TRAIN, "name=tiny", *halves,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((RunDir(run_dir).model("stage2") / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["pairs_seen"] == 3 * 4
    weights = load_file(RunDir(run_dir).model("stage2") / "model.safetensors")
    expected = load_file(RunDir(single_dir).model("stage2") / "model.safetensors")
    # Adam divides by the root of tiny second moments, so float-summation noise in a gradient
    # near zero (a rare token's embedding) can move a weight by ~1e-4 over seven steps.
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], atol=2e-4, rtol=1e-3)
        assert (weights[key] - expected[key]).abs().mean() < 1e-6, key


def _same_batches(first, second) -> bool:
    return all(a.targets.tasks == b.targets.tasks and len(a.inputs) == len(b.inputs)
               and all(torch.equal(x[key], y[key]) for x, y in zip(a.inputs, b.inputs) for key in x)
               for a, b in zip(first, second, strict=True))


def test_step_inputs_are_the_same_on_any_number_of_workers_and_after_a_resume(run_dir):
    settings = config("posttrain.stage1.steps=6", "posttrain.stage1.chunk_size=5").posttrain.stage1
    pairs = pair_table(run_dir, share=0.5, augment_size=32)
    embedder = Embedder.create(config().model, pairs.items.texts())
    steps = recipe.StepInputs(pairs, embedder.collate, settings, seed=3, stage=1, processes=Processes())
    cpu = torch.device("cpu")
    in_process = list(prepared_ahead(steps, cpu, workers=0))
    by_workers = list(prepared_ahead(steps, cpu, workers=2))  # real worker processes, interleaved steps
    resumed = list(prepared_ahead(steps, cpu, start=4, workers=1))
    assert len(in_process) == 6 and len(in_process[0].inputs) == 4  # 16 inputs in chunks of 5
    assert _same_batches(in_process, by_workers) and _same_batches(in_process[4:], resumed)
    assert not _same_batches(in_process[:1], in_process[1:2])  # each step its own pairs and views
