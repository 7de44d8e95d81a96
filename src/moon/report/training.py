"""The training-curves section: each stage's JSONL log as loss, learning-rate and throughput plots."""

from __future__ import annotations

import json
from pathlib import Path

from moon.config import MoonConfig
from moon.report import plots
from moon.report.html import Section, not_run, note, table
from moon.run import MANIFEST, RunDir
from moon.train.loop import read_log

STAGES = {  # each of MODEL_STAGES -> (what it is, the command that makes it, the log's throughput key and unit)
    "pretrain": ("pretraining", "moon pretrain", "examples_per_s", "examples/s"),
    "stage1": ("post-training stage 1", "moon posttrain --stage 1", "pairs_per_s", "pairs/s"),
    "stage2": ("post-training stage 2", "moon posttrain --stage 2", "pairs_per_s", "pairs/s"),
}


def section(config: MoonConfig, run_dir: Path) -> Section:
    parts, metrics = [], {}
    for stage, (name, command, rate_key, unit) in STAGES.items():
        parts.append(f"<h3>{name}</h3>")
        try:
            log = read_log(RunDir(run_dir).work(stage))
        except json.JSONDecodeError:
            parts.append(note(f"the {name} log is being written (a line is incomplete): build the report again later"))
            continue
        if not log:
            parts.append(not_run(f"no {name} log", command))
            continue
        summary = summarise(log, rate_key, batch_size(config, run_dir, stage))
        metrics[stage] = summary
        parts.append(plots.training_curves(name, losses(log), _series(log, "lr"), _series(log, rate_key), unit))
        parts.append(table(("", stage), summary_rows(summary, unit, _manifest(run_dir, stage))))
    return Section("training-curves", "Training curves", "\n".join(parts), {"training": metrics})


def losses(log: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """The overall loss and one line per task: pretraining logs `loss_<task>`, post-training `loss_by_task`."""
    series = _series(log, "loss")
    tasks = dict.fromkeys(t for record in log for t in _task_losses(record))
    for task in tasks:
        points = [(r["step"], _task_losses(r)[task]) for r in log if task in _task_losses(r)]
        series[task] = ([s for s, _ in points], [v for _, v in points])
    return series


def _task_losses(record: dict) -> dict[str, float]:
    if isinstance(record.get("loss_by_task"), dict):
        return record["loss_by_task"]
    return {key.removeprefix("loss_"): value for key, value in record.items() if key.startswith("loss_")}


def _series(log: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    points = [(r["step"], r[key]) for r in log if isinstance(r.get(key), (int, float))]
    return {key: ([s for s, _ in points], [v for _, v in points])} if points else {}


def summarise(log: list[dict], rate_key: str, batch: int | None) -> dict:
    """Final losses, mean throughput and the training time the logged throughput implies.

    The log records throughput per logging window, not wall time; a window of `steps` steps at
    `rate` examples/s took steps * batch / rate seconds.
    """
    last = log[-1]
    out = {"steps": last["step"], "final_loss": last.get("loss"), "final_loss_by_task": _task_losses(last)}
    if batch:
        seconds, previous = 0.0, 0
        for record in log:
            if record.get(rate_key):
                seconds += (record["step"] - previous) * batch / record[rate_key]
            previous = record["step"]
        out["train_seconds"] = seconds
        out[rate_key] = last["step"] * batch / seconds if seconds else None
    return out


def batch_size(config: MoonConfig, run_dir: Path, stage: str) -> int | None:
    """Examples per optimiser step over all processes: from the published model, else the config."""
    manifest = _manifest(run_dir, stage)
    if manifest.get("global_batch"):
        return int(manifest["global_batch"])
    if manifest.get("pairs_seen") and manifest.get("steps"):
        return int(manifest["pairs_seen"]) // int(manifest["steps"])
    settings = config.pretrain if stage == "pretrain" else getattr(config.posttrain, stage, None)
    return getattr(settings, "batch_size", None)


def summary_rows(summary: dict, unit: str, manifest: dict) -> list[tuple]:
    rate = next((v for k, v in summary.items() if k.endswith("_per_s")), None)
    rows = [("steps logged", summary["steps"]), ("final loss", summary["final_loss"])]
    rows += [(f"final loss: {task}", value) for task, value in summary["final_loss_by_task"].items()]
    if rate is not None:
        rows += [(f"mean throughput ({unit})", rate), ("training seconds (from the logged throughput)",
                                                       summary["train_seconds"])]
    held = manifest.get("heldout_loss", {})
    if "before" in held and "after" in held:
        rows += [("held-out loss before", held["before"]["loss"]), ("held-out loss after", held["after"]["loss"])]
    if manifest.get("started_from"):
        rows.append(("started from", manifest["started_from"]))
    return rows


def _manifest(run_dir: Path, stage: str) -> dict:
    path = RunDir(run_dir).model(stage) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}
