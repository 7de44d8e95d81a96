"""What every training recipe shares: processes, data order, optimiser, checkpoints, log.

A recipe (`pretrain.py`, `posttrain.py`) reads top to bottom and calls these helpers:

- `Processes.start()` joins the `torchrun` process group when there is one (gloo on
  CPU, nccl on GPU) and says which rank this is; a plain `python` run is rank 0 of 1.
- `batch_indices` fixes the data order from the seed alone: every epoch is a seeded
  permutation, step s takes the s-th global batch and each rank its slice. A resumed
  run therefore sees exactly the batches it would have seen.
- `Checkpoints` saves model, optimiser, schedule, step and any extra state every N
  steps into a temporary folder renamed into place, and restores the latest on start.
- `TrainLog` appends one JSON line per logged step (rank 0 only); on resume it drops the
  lines of steps after the checkpoint, so the log reads as one uninterrupted run.
- `publish` writes the finished model atomically where the next stage looks for it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moon import ui
from moon.config import TrainLoop
from moon.io.atomic import atomic_dir, atomic_json
from moon.io.tables import MANIFEST, utc_now

CHECKPOINT = "checkpoint"
LOG = "log.jsonl"


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls) -> Processes:
        """Joins the process group `torchrun` describes in the environment (none: one process)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def data_parallel(self, module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The module under DDP when there are several processes; itself otherwise."""
        if self.world_size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def from_rank_zero(self, value):
        """Rank 0's `value` on every rank: one process decides, all follow."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def progress(self, description: str, total: int, unit: str = "items"):
        """Rank 0's progress bar over its own share; other ranks work silently."""
        if self.is_main:
            return ui.progress(description, total, unit=unit)
        return nullcontext(lambda n=1: None)

    def say(self, message: str) -> None:
        """A log line from rank 0 only: every rank knows the same, one says it."""
        if self.is_main:
            ui.log(message)

    def stop(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def global_batch_indices(examples: int, batch_size: int, step: int, seed: int, world_size: int) -> np.ndarray:
    """The example indices of `step` for every rank, (world_size, batch_size).

    The global batch walks through seeded per-epoch permutations; a batch never
    straddles two epochs, so no example repeats within one.
    """
    global_batch = batch_size * world_size
    if examples < global_batch:
        raise ValueError(f"{examples} examples cannot fill a global batch of {global_batch}; lower batch_size")
    per_epoch = examples // global_batch
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(examples)
    return order[position * global_batch : (position + 1) * global_batch].reshape(world_size, batch_size)


def batch_indices(examples: int, batch_size: int, step: int, seed: int, processes: Processes) -> np.ndarray:
    """This rank's example indices for `step`: its slice of the step's global batch."""
    return global_batch_indices(examples, batch_size, step, seed, processes.world_size)[processes.rank]


def optimiser(parameters, loop: TrainLoop, fused: bool | None = None) -> tuple[torch.optim.Optimizer,
                                                                             torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warmup then cosine decay to 10% of the peak rate.

    AdamW's fused kernel (the default where every parameter is a float on a device that has it)
    updates all tensors at once; the per-tensor loop PyTorch otherwise takes on the CPU costs a tiny
    model several per cent of its step (`benchmarks/train.py --levers`)."""
    trainable = [p for p in parameters if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]  # no decay on norms, biases and temperatures
    rest = [p for p in trainable if p.ndim < 2]
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": loop.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=loop.lr,
        fused=fused or None,
    )

    def factor(step: int) -> float:
        if step < loop.warmup_steps:
            return (step + 1) / loop.warmup_steps
        progress = (step - loop.warmup_steps) / max(1, loop.steps - loop.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optim, torch.optim.lr_scheduler.LambdaLR(optim, factor)


class Checkpoints:
    """The latest resumable state of one training stage, in `<work_dir>/checkpoint/`.

    A checkpoint is resumed only by a run of the same config (`digest`); another config
    starts over, since its data order and schedule would not match the saved state.
    """

    def __init__(self, work_dir: Path, processes: Processes, digest: str):
        self.path = Path(work_dir) / CHECKPOINT
        self.processes = processes
        self.digest = digest

    def save(self, step: int, modules: dict[str, object], extra: dict | None = None) -> None:
        """Saves the state dicts of `modules` (model, optimiser, schedule...) after `step` steps."""
        if self.processes.is_main:
            state = {name: module.state_dict() for name, module in modules.items()}
            with atomic_dir(self.path) as tmp:
                torch.save({"step": step, "digest": self.digest, "state": state, "extra": extra or {}}, tmp / "state.pt")
        self.processes.barrier()

    def restore(self, modules: dict[str, object]) -> tuple[int, dict]:
        """Loads the latest checkpoint into `modules`; returns (steps done, extra), or (0, {}) if none."""
        file = self.path / "state.pt"
        if not file.exists():
            return 0, {}
        saved = torch.load(file, map_location=self.processes.device, weights_only=False)
        if saved.get("digest") != self.digest:
            return 0, {}
        for name, module in modules.items():
            module.load_state_dict(saved["state"][name])
        return saved["step"], saved["extra"]


class TrainLog:
    """JSON lines, one per logged step, written by rank 0."""

    def __init__(self, work_dir: Path, processes: Processes, resume_step: int):
        self.path = Path(work_dir) / LOG
        self.enabled = processes.is_main
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


def read_log(work_dir: Path) -> list[dict]:
    path = Path(work_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def publish(save: Callable[[Path], object], final: Path, manifest: dict) -> Path:
    """Writes a finished model with `save(tmp_dir)` plus its manifest, then renames it to `final`."""
    with atomic_dir(final) as tmp:
        save(tmp)
        atomic_json(tmp / MANIFEST, {**manifest, "created_at": utc_now()})
    return Path(final)
