"""Contrastive post-training, MOON stages 1 and 2: the recipe, top to bottom.

Stage 1 trains on the nine mixed-modality tasks of `pairs_stage1` with in-batch
negatives; stage 2 on the cleaned purchases of `pairs_stage2`, adding the pair table's
hard negatives, spatial negatives (the positives of every rank) and temporal negatives
(a queue of item embeddings from past steps). The loss (`PosttrainLoss`) is InfoNCE with
a temperature and a weight per task, false negatives (same item, same SPU, same
near-duplicate group) masked, at every Matryoshka dimension, plus the descriptor
distillation.

Step s's inputs (`StepInputs[s]`: the pairs, their augmented views, collated) are a pure
function of (seed, stage, s), so `input_workers` can build the next steps while the model
computes without changing them. One step embeds the queries and positives of this rank's
slice of the global batch in one forward pass (so DDP sees each parameter once), in
GradCache chunks when `chunk_size` is set. Launch `torchrun --nproc_per_node N -m moon posttrain ...` to train
data-parallel; the data order, and therefore the result, depends only on the seed (and,
with `spatial_negatives: false`, on the number of processes: each rank's loss is then
over its own pairs).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from moon import ui
from moon.config import MoonConfig, PosttrainStage
from moon.errors import UserError
from moon.io import schema
from moon.io.tables import has_table, read_manifest, read_table
from moon.model.backbone import autocast, prepare_for_training
from moon.model.embedder import Embedder
from moon.model.inputs import Collator, Input, prepared_ahead
from moon.model.views import ItemViews, query_input
from moon.run import MODEL_STAGES, RunDir
from moon.train.augment import augment
from moon.train.distill import DescriptorDistillation, targets
from moon.train.grad_cache import grad_cache_step
from moon.train.loop import (
    Checkpoints,
    Processes,
    TrainLog,
    global_batch_indices,
    optimiser,
    publish,
)
from moon.train.losses import LossParts, PosttrainLoss, TaskTemperatures
from moon.train.negatives import EmbeddingQueue, gather_from_ranks, gather_uneven
from moon.views import SERVED_VIEW

SECTIONS = ("world", "behaviour", "ingest", "pairs", "model", "pretrain", "posttrain")
STAGES = {1: MODEL_STAGES[1], 2: MODEL_STAGES[2]}  # --stage N -> its model stage
CATALOGUE_TASK = f"image->{SERVED_VIEW}"  # a catalogue self-pair: the item's image finds the item as served


def posttrain(config: MoonConfig, run_dir: Path, stage: int) -> Path:
    """Trains one post-training stage and publishes the embedder to `models/stage<N>/`."""
    settings: PosttrainStage = getattr(config.posttrain, STAGES[stage])
    run = RunDir(run_dir)
    processes = Processes.start()
    items = ItemViews(read_table(run_dir, "items"))
    pairs = PairTable(train_pairs(run_dir, stage), items, product_keys(run_dir, items), settings.catalogue_pairs,
                      config.model.image_size if settings.augment_images else None, settings.restage_images)
    trained_on = pairs_digest_of(run_dir, stage)
    embedder, source = starting_embedder(config, run_dir, stage, pairs)
    embedder.backbone = prepare_for_training(embedder.backbone, config.model)
    embedder.to(processes.device).train()
    temperatures = TaskTemperatures(schema.TASKS, settings.temperature, settings.learnable_temperature)
    temperatures.to(processes.device)
    distillation = None
    if settings.distill_weight:
        with ui.progress("describe catalogue images for distillation", len(items), unit="images") as advance:
            distillation = DescriptorDistillation.for_catalogue(items.images, embedder.dim, settings.distill_temperature,
                                                                config.seed, advance).to(processes.device)
    dims = sorted({*embedder.settings.matryoshka_dims, embedder.dim})
    loss = PosttrainLoss(temperatures, dims, settings.matryoshka_weights, settings.task_weights, distillation,
                         settings.distill_weight, settings.symmetric)
    # text-only batches leave the vision tower unused, hence find_unused_parameters
    model = processes.data_parallel(embedder, find_unused_parameters=True)
    queue = EmbeddingQueue(settings.queue_size, settings.queue_max_age)
    step_loss = ContrastiveStep(model, embedder, loss, queue, settings, processes)
    optim, schedule = optimiser([*embedder.parameters(), *step_loss.heads], settings)
    state = {"model": embedder, "temperatures": temperatures, "optimiser": optim, "schedule": schedule, "queue": queue}
    if distillation:
        state["distillation"] = distillation

    # A checkpoint is resumed only on the same pairs too: they follow the labelled query set, not only the config.
    checkpoints = Checkpoints(run.work(STAGES[stage]), processes, f"{config.digest(*SECTIONS)}:{trained_on}")
    start, _ = checkpoints.restore(state)
    log = TrainLog(run.work(STAGES[stage]), processes, start)
    global_batch = settings.batch_size * processes.world_size
    if start:
        ui.log(f"resuming post-training stage {stage} after step {start}")

    steps = StepInputs(pairs, embedder.collate, settings, config.seed, stage, processes)
    with ui.progress(f"post-train stage {stage}", settings.steps * global_batch, unit="pairs") as advance:
        advance(start * global_batch)
        clock, since = time.perf_counter(), start
        for step, batch in enumerate(prepared_ahead(steps, processes.device, start, settings.input_workers), start):
            stats = step_loss(batch, step)
            torch.nn.utils.clip_grad_norm_([*embedder.parameters(), *step_loss.heads], 1.0)
            optim.step()
            schedule.step()
            optim.zero_grad(set_to_none=True)
            advance(global_batch)
            done = step + 1
            if done % settings.log_every == 0 or done == settings.steps:
                elapsed = time.perf_counter() - clock
                log.write({"step": done, **stats, "lr": schedule.get_last_lr()[0],
                           "temperatures": temperatures.values(), "pairs_per_s": (done - since) * global_batch / elapsed})
                clock, since = time.perf_counter(), done
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                checkpoints.save(done, state)

    manifest = {"stage": stage, "config_digest": config.digest(*SECTIONS), "pairs_digest": trained_on,
                "started_from": source,
                "steps": settings.steps, "pairs_seen": settings.steps * global_batch, "train_pairs": len(pairs),
                "processes": processes.world_size, "temperatures": temperatures.values()}
    final = run.model(STAGES[stage])
    if processes.is_main:
        publish(embedder.save, final, manifest)
    processes.stop()
    return final


def pairs_digest_of(run_dir: Path, stage: int) -> str | None:
    """The digest of the pair table a stage trains on (it follows the labelled query set too)."""
    return read_manifest(run_dir, f"pairs_stage{stage}").get("config_digest")


def is_current(config: MoonConfig, run_dir: Path, stage: int) -> bool:
    """Whether the published model of a stage was trained with this config on the pairs now in the run:
    the pairs can change while the config does not (a labelled query set ingested). A model published
    before models recorded their pairs was trained without a labelled set."""
    pairs = f"pairs_stage{stage}"
    if not RunDir(run_dir).has_model(STAGES[stage]) or not has_table(run_dir, pairs):
        return False
    model = read_manifest(run_dir, f"models/{STAGES[stage]}")
    if model.get("config_digest") != config.digest(*SECTIONS):
        return False
    if "pairs_digest" in model:
        return model["pairs_digest"] == pairs_digest_of(run_dir, stage)
    return read_manifest(run_dir, pairs).get("labelled_queries") is None


def starting_embedder(config: MoonConfig, run_dir: Path, stage: int, pairs: PairTable) -> tuple[Embedder, str]:
    """Stage 2 continues stage 1; stage 1 starts from the pretraining checkpoint when there is
    one (and `posttrain.from_pretrained`), else from `model.checkpoint` or a new tiny model."""
    run = RunDir(run_dir)
    if stage == 2:
        source = run.model("stage1")
        if not run.has_model("stage1"):
            raise UserError(f"no stage-1 model in {source}: run `moon posttrain --stage 1` first")
    else:
        source = run.model("pretrain")
        if not (config.posttrain.from_pretrained and run.has_model("pretrain")):
            corpus = [*pairs.items.texts(), *pairs.text_corpus()]
            return Embedder.create(config.model, corpus, seed=config.seed), config.model.checkpoint or "random init"
    return Embedder.load(source), str(source)  # with the attention it was published with


def train_pairs(run_dir: Path, stage: int) -> pa.Table:
    name = f"pairs_stage{stage}"
    if not has_table(run_dir, name):
        raise UserError(f"no {name} table in {run_dir}: run `moon pairs` first")
    table = read_table(run_dir, name)
    return table.filter(pc.equal(table["split"], "train"))


def product_keys(run_dir: Path, items: ItemViews) -> torch.Tensor:
    """Per catalogue row: (item, SPU, near-duplicate group) codes; equal codes = same product."""
    table = read_table(run_dir, "items", columns=["spu_id"])
    _, spu = np.unique(np.array(table["spu_id"].to_pylist(), dtype=object), return_inverse=True)
    group = np.arange(len(items)) + len(items)  # an item outside every group is its own
    if has_table(run_dir, "near_duplicates"):
        duplicates = read_table(run_dir, "near_duplicates")
        _, codes = np.unique(np.array(duplicates["group_id"].to_pylist(), dtype=object), return_inverse=True)
        group[items.rows(duplicates["item_id"].to_pylist())] = codes
    return torch.from_numpy(np.stack([np.arange(len(items)), spu, group], axis=1))


@dataclass
class Targets:
    """What the loss needs of a step besides the embeddings, for the whole global batch (rank-major)."""

    tasks: list[str]
    weights: torch.Tensor
    positive_keys: torch.Tensor  # (B, 3)
    hard_keys: torch.Tensor  # (H, 3)
    distill_targets: torch.Tensor  # (2B,): the catalogue row each query, then each positive, pictures

    def own(self, rank: int, local_pairs: int) -> Targets:
        """As if this rank's pairs were all there are (the hard negatives stay global)."""
        mine = slice(rank * local_pairs, (rank + 1) * local_pairs)
        return replace(self, tasks=self.tasks[mine], weights=self.weights[mine], positive_keys=self.positive_keys[mine],
                       distill_targets=self.distill_targets.reshape(2, -1)[:, mine].reshape(-1))


@dataclass
class PairInputs:
    """One step's pairs as the embedder's inputs: this rank's slice, and every rank's targets."""

    queries: list[Input]
    positives: list[Input]
    hard_negatives: list[Input]  # this rank's share
    targets: Targets

    def collated(self, collate: Collator, chunk_size: int = 0) -> Batch:
        return Batch(len(self.queries), _collated(self.queries + self.positives, collate, chunk_size),
                     _collated(self.hard_negatives, collate, chunk_size), self.targets)


@dataclass
class Batch:
    """One step, ready for the model: this rank's inputs as tensors, in chunks of `chunk_size`
    inputs (GradCache; one chunk when 0), and every rank's targets."""

    local_pairs: int
    inputs: list[dict[str, torch.Tensor]]  # this rank's queries, then its positives
    hard_negatives: list[dict[str, torch.Tensor]]
    targets: Targets


class StepInputs(torch.utils.data.Dataset):
    """Step s's batch for this rank, a pure function of (seed, stage, s): the same on any number of
    input workers, and the same again when a run resumes at s."""

    def __init__(self, pairs: PairTable, collate: Collator, settings: PosttrainStage, seed: int, stage: int,
                 processes: Processes):
        self.pairs, self.collate, self.settings = pairs, collate, settings
        self.seed, self.stage, self.rank, self.world_size = seed, stage, processes.rank, processes.world_size

    def __len__(self) -> int:
        return self.settings.steps

    def __getitem__(self, step: int) -> Batch:
        indices = global_batch_indices(len(self.pairs), self.settings.batch_size, step, self.seed, self.world_size)
        rng = np.random.default_rng([self.seed, self.stage, step])
        pairs = self.pairs.batch(indices, self.rank, self.settings.hard_negatives, rng)
        return pairs.collated(self.collate, self.settings.chunk_size)


class PairTable:
    """The training pairs of a stage, turned into inputs for the embedder.

    `catalogue_share` of the pairs are catalogue self-pairs (an item's own image as the
    query, augmented, and the item as the positive), added after the behaviour pairs.
    With `augment_size`, every image query is a new random view of size x size pixels;
    with `restage` too, catalogue self-pairs are mostly pasted onto the pairs' photos.
    """

    def __init__(self, table: pa.Table, items: ItemViews, keys: torch.Tensor, catalogue_share: float = 0.0,
                 augment_size: int | None = None, restage: bool = False):
        if table.num_rows == 0:
            raise UserError("the pair table has no training pairs: simulate more behaviour or lower pairs.test_days")
        self.items, self.keys, self.augment_size, self.restage = items, keys, augment_size, restage
        self.tasks = table["task"].to_pylist()
        self.query_views = table["query_view"].to_pylist()
        self.query_texts = table["query_text"].to_pylist()
        self.query_images = table["query_image"].to_pylist()
        self.query_rows = [None if i is None else items.row[i] for i in table["query_item_id"].to_pylist()]
        self.positive_rows = items.rows(table["pos_item_id"].to_pylist())
        self.item_views = table["item_view"].to_pylist()
        self.hard_rows = [items.rows(ids) for ids in table["hard_neg_item_ids"].to_pylist()]
        self.weights = table["weight"].to_numpy()
        self.behaviour_pairs = table.num_rows  # the catalogue self-pairs follow
        # Shoppers' photos are the scenes that catalogue self-pairs are re-staged onto.
        self.scenes = [image for image, view in zip(self.query_images, self.query_views) if view == "image"]
        self._add_catalogue_pairs(round(table.num_rows * catalogue_share / (1 - catalogue_share)))
        self.weights = torch.tensor(self.weights, dtype=torch.float32)
        # A photo query pictures its positive item; an item view with an image pictures itself.
        self.query_pictures = targets(self.positive_rows, np.array(self.query_views) == "image")
        self.positive_pictures = targets(self.positive_rows, np.char.endswith(np.array(self.item_views), "image"))

    def _add_catalogue_pairs(self, count: int) -> None:
        rows = np.arange(count) % len(self.items)
        self.tasks += [CATALOGUE_TASK] * count
        self.query_views += ["image"] * count
        self.query_texts += [None] * count
        self.query_images += [self.items.images[row] for row in rows]
        self.query_rows += [None] * count
        self.positive_rows = np.concatenate([self.positive_rows, rows])
        self.item_views += [CATALOGUE_TASK.split("->")[1]] * count
        self.hard_rows += [rows[:0]] * count
        self.weights = np.concatenate([self.weights, np.ones(count, dtype=np.float32)])

    def __len__(self) -> int:
        return len(self.tasks)

    def text_corpus(self) -> list[str]:
        """The pairs' query texts, e.g. for a tokenizer trained on them."""
        return [text for text in self.query_texts if text]

    def batch(self, indices: np.ndarray, rank: int, hard_per_pair: float, rng: np.random.Generator) -> PairInputs:
        """`indices` is the global batch, (ranks, pairs per rank); `rank` says which row is ours.
        Hard negatives are drawn for every rank from one seeded stream, so all ranks agree."""
        flat = indices.reshape(-1)
        hard = [self._hard(i, hard_per_pair, rng) for i in flat]
        views = rng.integers(2**63, size=indices.shape)[rank]  # each query's augmentation, the same on any world size
        mine = indices[rank]
        my_hard = [(int(i), row) for i, rows in zip(mine, hard[rank * len(mine) : (rank + 1) * len(mine)]) for row in rows]
        hard_rows = np.array([row for rows in hard for row in rows], dtype=np.int64)
        return PairInputs(
            queries=[self._query(int(i), view) for i, view in zip(mine, views)],
            positives=[self.items.input(self.positive_rows[i], self.item_views[i]) for i in mine],
            hard_negatives=[self.items.input(row, self.item_views[i]) for i, row in my_hard],
            targets=Targets(
                tasks=[self.tasks[i] for i in flat],
                weights=self.weights[flat],
                positive_keys=self.keys[self.positive_rows[flat]],
                hard_keys=self.keys[hard_rows] if len(hard_rows) else self.keys[:0],
                distill_targets=torch.from_numpy(np.concatenate([self.query_pictures[flat],
                                                                 self.positive_pictures[flat]])),
            ),
        )

    def _query(self, i: int, view_seed: int) -> Input:
        query = query_input(self.query_views[i], self.query_texts[i], self.query_images[i], self.query_rows[i], self.items)
        if self.augment_size and self.query_views[i] == "image":
            scenes = self.scenes if self.restage and i >= self.behaviour_pairs else ()
            query = Input(None, augment(query.image, np.random.default_rng(view_seed), self.augment_size, scenes))
        return query

    def _hard(self, i: int, per_pair: float, rng: np.random.Generator) -> np.ndarray:
        rows = self.hard_rows[i]
        count = int(per_pair) + int(rng.random() < per_pair % 1)  # the fraction is a chance of one more
        if count == 0 or len(rows) == 0:
            return rows[:0]
        return rng.choice(rows, size=min(count, len(rows)), replace=False)


class ContrastiveStep:
    """Forward and backward of one step; gradients are left in the parameters.

    With spatial negatives, every rank gathers the queries and positives of all ranks and
    computes the whole batch's loss; without, each rank computes the loss of its own pairs.
    """

    def __init__(self, model, embedder: Embedder, loss: PosttrainLoss, queue: EmbeddingQueue,
                 settings: PosttrainStage, processes: Processes):
        self.model, self.embedder, self.loss, self.queue = model, embedder, loss, queue
        # Parameters outside DDP (temperatures, distillation head): this step reduces their gradients itself.
        self.heads = list(loss.parameters())
        self.settings, self.processes = settings, processes
        # Every rank computes the whole batch's loss but back-propagates only into its own rows;
        # DDP averages over ranks, so the world size restores the full gradient. A rank's own
        # loss needs no scaling: DDP's average is the average of the ranks' losses.
        self.scale = processes.world_size if settings.spatial_negatives else 1

    def __call__(self, batch: Batch, step: int) -> dict:
        device = self.processes.device
        spatial = self.settings.spatial_negatives
        targets = batch.targets if spatial else batch.targets.own(self.processes.rank, batch.local_pairs)
        gather = gather_from_ranks if spatial else _itself
        hard = self._hard_negatives(batch)
        queued, queued_keys = self.queue.get(step)
        keys = (targets.positive_keys, batch.targets.hard_keys, queued_keys)
        candidate_keys = torch.cat([k for k in keys if k is not None])
        masked = _same_product(targets.positive_keys, candidate_keys).to(device)
        parts: LossParts | None = None
        positives: torch.Tensor | None = None

        def loss(embeddings: torch.Tensor) -> torch.Tensor:
            nonlocal parts, positives
            queries, positives = gather(embeddings[: batch.local_pairs]), gather(embeddings[batch.local_pairs :])
            candidates = torch.cat([c for c in (positives, hard, queued) if c is not None])
            value, parts = self.loss(queries, candidates, positives, targets.tasks, targets.weights.to(device), masked,
                                     targets.distill_targets.to(device))
            return value * self.scale

        self._forward_backward(batch.inputs, loss)
        self._reduce_head_gradients()
        # The queue takes every rank's positives either way, so it is the same on every rank.
        self.queue.push(positives if spatial else gather_from_ranks(positives.detach()), batch.targets.positive_keys,
                        step)
        return self._stats(targets.tasks, parts, masked)

    def _reduce_head_gradients(self) -> None:
        """DDP leaves the heads alone. With spatial negatives every rank has the same gradient for
        them, of the scaled loss: unscale it. Without, each rank has its own loss's: average them."""
        world_size = self.processes.world_size
        if world_size == 1:
            return
        for parameter in self.heads:
            if self.settings.spatial_negatives:
                if parameter.grad is not None:
                    parameter.grad /= world_size
            else:
                if parameter.grad is None:  # unused on this rank, perhaps not on the others
                    parameter.grad = torch.zeros_like(parameter)
                dist.all_reduce(parameter.grad)
                parameter.grad /= world_size

    def _forward_backward(self, chunks: list[dict[str, torch.Tensor]], loss) -> None:
        device = self.processes.device
        if len(chunks) == 1:
            loss(self._encode(_to(chunks[0], device))).backward()
            return
        chunks = [_to(chunk, device) for chunk in chunks]
        grad_cache_step(self._encode, [chunks], loss, getattr(self.model, "no_sync", nullcontext))

    def _encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Through DDP when gradients flow (its hooks all-reduce them), directly otherwise."""
        with autocast(self.embedder.settings, self.processes.device):
            return self.model(batch) if torch.is_grad_enabled() else self.embedder(batch)

    @torch.no_grad()
    def _hard_negatives(self, batch: Batch) -> torch.Tensor | None:
        """Hard negatives, embedded without gradient by each rank and shared with all."""
        if not len(batch.targets.hard_keys):
            return None
        local = [self._encode(_to(chunk, self.processes.device)) for chunk in batch.hard_negatives]
        local = torch.cat(local) if local else torch.empty(0, self.embedder.dim, device=self.processes.device)
        return gather_uneven(local, len(batch.targets.hard_keys))

    def _stats(self, tasks: list[str], parts: LossParts, masked: torch.Tensor) -> dict:
        """The loss and its parts as this rank computed them, so without spatial negatives its own pairs'."""
        per_pair = parts.per_pair.cpu().numpy()
        by_task = {}
        for task in sorted(set(tasks)):
            rows = [i for i, t in enumerate(tasks) if t == task]
            by_task[task] = float(per_pair[rows].mean())
        negatives = (masked.shape[1] - masked.sum(1)).float().mean().item()  # masked (pairs, candidates) includes the positive
        stats = {"loss": float(parts.total), "loss_by_task": by_task, "negatives": negatives, "queue": len(self.queue)}
        if parts.distill is not None:
            stats["distill_loss"] = float(parts.distill)
        return stats


def _collated(inputs: list[Input], collate: Collator, chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """`inputs` as model tensors, in chunks of `chunk_size` (0: one chunk); none for no inputs."""
    chunk = chunk_size or len(inputs) or 1
    return [collate(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)]


def _itself(local: torch.Tensor) -> torch.Tensor:
    """No gathering: this rank's rows only."""
    return local


def _same_product(positive_keys: torch.Tensor, candidate_keys: torch.Tensor) -> torch.Tensor:
    """(B, N): candidate j is the same product as query i's positive (item, SPU or group)."""
    return (positive_keys[:, None, :] == candidate_keys[None, :, :]).any(-1)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
