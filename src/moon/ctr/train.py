"""`moon ctr train`: each model of `ctr.models`, once per seed of `ctr.seeds`, on the train days.

A recipe in one file, top to bottom: load the samples and, for models that read them, the
representation tables of the store version the spec (or `ctr.representations`) names; then
per model and seed: Adam on binary cross-entropy over seeded shuffles of the train split,
the valid AUC after every epoch, early stopping after `ctr.patience` epochs without a better
one, and the best epoch's weights kept. Every compared model runs the same schedule.

Each run is published atomically under `ctr/<label>-<digest>/seed-<s>/`: the weights
(`model.pt`, without the frozen representation table, which the checkpoint names by store
version instead), `result.json` (settings, store version, valid AUC per epoch, best epoch)
and the test split's predicted click probabilities (`test_predictions.npy`), which
`moon ctr eval` scores. A run whose result exists is reused, so a rerun trains only what is
missing. Under `torchrun` each process takes its slice of every batch (DDP); rank 0
evaluates and publishes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moon import ui
from moon.config import CubeBranches, MoonConfig
from moon.ctr.data import CtrData
from moon.ctr.features import FeatureSpec, load_spec
from moon.ctr.models import MODELS
from moon.ctr.representations import RepresentationTable, resolve_version
from moon.eval.metrics import auc
from moon.io.atomic import atomic_dir
from moon.run import RunDir
from moon.train.loop import Processes

RESULT, WEIGHTS, PREDICTIONS = "result.json", "model.pt", "test_predictions.npy"
SCHEDULE = "linear decay to 0 over max_epochs"  # in every run's settings: runs under another schedule are not reused
SETTINGS = ("embedding_dim", "hidden", "attention_hidden", "batch_size", "lr", "embedding_decay", "max_epochs", "patience",
            "max_len", "query_max_len", "distinct_items")


def train(config: MoonConfig, run_dir: Path, models: list[str] | None = None) -> list[Path]:
    """Trains every model and seed not trained yet; returns their result folders."""
    processes = Processes.start()
    data = CtrData.load(run_dir, load_spec(config))
    done = []
    for name in models or config.ctr.models:
        versions = config.ctr.versions() if MODELS[name].representations else [None]
        for version in versions:
            spec = load_spec(config, version)
            tables = representation_tables(run_dir, spec, data) if MODELS[name].representations else {}
            for seed in config.ctr.seeds:
                done.append(train_one(config, run_dir, name, seed, spec, data, tables, processes))
    processes.stop()
    return done


def representation_tables(run_dir: Path, spec: FeatureSpec, data: CtrData) -> dict[str, RepresentationTable]:
    """The frozen tables of the spec's representation features, aligned with the data's rows."""
    tables = {}
    keys = {"item_id": data.item_ids, "query_id": data.query_ids}
    for feature in spec.of_type("representation"):
        version = resolve_version(run_dir, feature.version)
        table = RepresentationTable.load(version, keys[feature.of], feature.of, feature.dim)
        ui.log(f"{feature.name}: store version {table.version}, dim {table.dim}, "
               f"{table.coverage:.1%} of {len(keys[feature.of]):,} {feature.of}s present")
        tables[feature.of] = table
    if len({table.dim for table in tables.values()}) > 1:
        raise ValueError("item and query representations must share one dim: set ctr.dim")
    return tables


def label(name: str, config: MoonConfig, tables: dict[str, RepresentationTable]) -> str:
    """What a run is, for people: the model, CUBE's switched-off branches and top-K, and the
    representations it read (`cube@v1-stage2/64`)."""
    text = name
    if name == "cube":
        cube, default = config.ctr.cube.model_dump(), CubeBranches().model_dump()
        text += "".join(f"-no_{part}" if value is False else f"-{part}" if value is True else f"-{part}_{value}"
                        for part, value in cube.items() if value != default[part])
        text += f"-top{config.ctr.top_k}" if config.ctr.top_k else ""
    if tables:
        item = tables["item_id"]
        text += f"@{item.version}/{item.dim}"
    return text


def run_settings(name: str, config: MoonConfig, spec: FeatureSpec, tables: dict, run_dir: Path) -> dict:
    """Everything a run's result depends on; its digest names the run's folder."""
    settings = {key: getattr(config.ctr, key) for key in SETTINGS}
    samples = json.loads((RunDir(run_dir).table("ctr_samples") / "manifest.json").read_text())
    features = spec.model_dump(mode="json")
    for feature in features["features"]:  # the version read, however it was named (stage2, v1-stage2)
        if feature["type"] == "representation" and feature["of"] in tables:
            feature |= {"version": tables[feature["of"]].version, "dim": tables[feature["of"]].dim}
    return {
        "model": name, "revision": MODELS[name].revision, "label": label(name, config, tables), "spec": features,
        "cube": config.ctr.cube.model_dump() if name == "cube" else None,
        "top_k": config.ctr.top_k if name == "cube" else None,
        "representations": {of: {"version": t.version, "made_at": t.made_at, "dim": t.dim} for of, t in tables.items()},
        "samples": samples["created_at"], "schedule": SCHEDULE, **settings,
    }


def run_folder(run_dir: Path, settings: dict) -> Path:
    digest = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "label"}, sort_keys=True)
                            .encode()).hexdigest()[:10]
    safe = settings["label"].replace("/", "_").replace("@", "_")
    return RunDir(run_dir).ctr_models / f"{safe}-{digest}"


def train_one(config: MoonConfig, run_dir: Path, name: str, seed: int, spec: FeatureSpec, data: CtrData,
              tables: dict, processes: Processes) -> Path:
    settings = run_settings(name, config, spec, tables, run_dir)
    folder = run_folder(run_dir, settings) / f"seed-{seed}"
    if (folder / RESULT).is_file():
        ui.log(f"[dim]{settings['label']} seed {seed}: trained before, reused ({folder})[/dim]")
        return folder
    torch.manual_seed(seed)
    model = MODELS[name](spec, data, config.ctr, tables).to(processes.device)
    trained = processes.data_parallel(model, find_unused_parameters=True)  # an ablated CUBE branch leaves tables unused
    optimiser = make_optimiser(model, config)
    history, best, best_state, waited = [], -1.0, None, 0
    started = time.perf_counter()
    ctr = config.ctr
    steps = -(-len(data.splits["train"]) // (ctr.batch_size * processes.world_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, linear_decay(steps * ctr.max_epochs))
    for epoch in range(ctr.max_epochs):
        model.train()
        batches = data.batches("train", ctr.batch_size, ctr.max_len, ctr.query_max_len, seed=seed * 1000 + epoch,
                               rank=processes.rank, world_size=processes.world_size, distinct_items=ctr.distinct_items)
        with processes.progress(f"{settings['label']} seed {seed} epoch {epoch + 1}", steps, unit="steps") as advance:
            for batch in batches:
                batch = {key: value.to(processes.device) for key, value in batch.items()}
                loss = nn.functional.binary_cross_entropy_with_logits(trained(batch), batch["label"])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                advance(1)
        valid = processes.from_rank_zero(auc(*_labels_and_scores(model, data, "valid", config)) if processes.is_main else None)
        history.append({"epoch": epoch + 1, "valid_auc": valid, "seconds": round(time.perf_counter() - started, 1)})
        if valid > best:
            best, waited = valid, 0
            best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        else:
            waited += 1
            if waited > ctr.patience:
                break
    model.load_state_dict(best_state)
    if processes.is_main:
        _, test = _labels_and_scores(model, data, "test", config)
        result = {**settings, "seed": seed, "valid_auc": best, "best_epoch": max(history, key=lambda h: h["valid_auc"])["epoch"],
                  "epochs": history, "train_samples": len(data.splits["train"]), "processes": processes.world_size,
                  "samples_per_s": round(len(data.splits["train"]) * len(history) / (time.perf_counter() - started))}
        with atomic_dir(folder) as tmp:
            torch.save({"state_dict": model.state_dict(), "representations": settings["representations"]}, tmp / WEIGHTS)
            np.save(tmp / PREDICTIONS, test.astype(np.float32))
            (tmp / RESULT).write_text(json.dumps(result, indent=2))
        ui.log(f"{settings['label']} seed {seed}: valid AUC {best:.4f} (epoch {result['best_epoch']} of "
               f"{len(history)}), {result['samples_per_s']:,} samples/s")
    processes.barrier()
    return folder


def make_optimiser(model: nn.Module, config: MoonConfig) -> torch.optim.Optimizer:
    """Adam; ID embedding tables also decay towards zero (`ctr.embedding_decay`): most ids are
    seen a few times, and unchecked their embeddings memorise the training days."""
    tables = [p for name, p in model.named_parameters() if name.startswith("embeddings.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("embeddings.")]
    return torch.optim.AdamW([{"params": tables, "weight_decay": config.ctr.embedding_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.ctr.lr)


def linear_decay(total_steps: int):
    """The learning rate's factor at each step: from 1 down to 0 at the last step of `max_epochs`.
    The end of training moves in small steps, so the last epochs' valid AUC is steady and the
    best one is rarely a lucky jump."""
    return lambda step: max(0.0, 1.0 - step / total_steps)


@torch.no_grad()
def predict(model: nn.Module, data: CtrData, split: str, config: MoonConfig) -> np.ndarray:
    """Click probabilities of a split's samples, in the split's order."""
    model.eval()
    device = next(model.parameters()).device
    out = [torch.sigmoid(model({k: v.to(device) for k, v in batch.items()})).cpu()
           for batch in data.batches(split, 4096, config.ctr.max_len, config.ctr.query_max_len,
                                     distinct_items=config.ctr.distinct_items)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def _labels_and_scores(model: nn.Module, data: CtrData, split: str, config: MoonConfig):
    return data.samples["label"][data.splits[split]], predict(model, data, split, config)
