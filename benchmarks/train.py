"""Post-training speed of the tiny preset: pairs/s, achieved FLOP/s against this machine's
matmul peak measured in the same run, and the cost of stage 2's extras (hard negatives,
queue, gather, descriptor distillation) against a plain in-batch InfoNCE step of the same
model.

    python benchmarks/train.py [--run-dir runs/demo] [--steps 20]

Needs a run directory with pair tables (`moon demo` makes runs/demo). Prints JSON lines;
the last is the headline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from moon import ui
from moon.config import load_config
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.views import ItemViews
from moon.train import posttrain as recipe
from moon.train.distill import DescriptorDistillation
from moon.train.loop import Processes, global_batch_indices, optimiser
from moon.train.losses import PosttrainLoss, TaskTemperatures
from moon.train.negatives import EmbeddingQueue


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul: the most this CPU does for a model's linear layers."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def trainer(run_dir: Path, stage: int, overrides: list[str]):
    config = load_config(None, overrides)
    settings = getattr(config.posttrain, f"stage{stage}")
    items = ItemViews(read_table(run_dir, "items"))
    pairs = recipe.PairTable(recipe.train_pairs(run_dir, stage), items, recipe.product_keys(run_dir, items))
    embedder = Embedder.create(config.model, items.texts(), seed=0)
    temperatures = TaskTemperatures(recipe.schema.TASKS, settings.temperature)
    distillation = None
    if settings.distill_weight:
        distillation = DescriptorDistillation.for_catalogue(items.images, embedder.dim, settings.distill_temperature)
    queue = EmbeddingQueue(settings.queue_size, settings.queue_max_age)
    dims = sorted({*embedder.settings.matryoshka_dims, embedder.dim})
    loss = PosttrainLoss(temperatures, dims, settings.matryoshka_weights, settings.task_weights, distillation,
                         settings.distill_weight, settings.symmetric)
    step = recipe.ContrastiveStep(embedder, embedder, loss, queue, settings, Processes())
    optim, _ = optimiser([*embedder.parameters(), *step.heads], settings)

    def run(index: int) -> None:
        indices = global_batch_indices(len(pairs), settings.batch_size, index, 0, 1)
        batch = pairs.batch(indices, 0, settings.hard_negatives, np.random.default_rng(index))
        step(batch, index)
        optim.step()
        optim.zero_grad(set_to_none=True)

    return run, settings.batch_size


def pairs_per_second(run, batch_size: int, steps: int) -> float:
    run(0)  # warm-up
    start = time.perf_counter()
    for index in range(1, steps + 1):
        run(index)
    return steps * batch_size / (time.perf_counter() - start)


def step_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run(0)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    ui.set_quiet(True)
    run_dir = Path(args.run_dir)
    peak = matmul_peak()
    print(json.dumps({"matmul_peak_gflops": round(peak / 1e9, 1)}))

    # plain in-batch InfoNCE on the stage-2 pairs: no hard negatives, no queue, no distillation
    plain_overrides = ["posttrain.stage2.hard_negatives=0", "posttrain.stage2.queue_size=0",
                       "posttrain.stage2.distill_weight=0"]
    plain, batch = trainer(run_dir, 2, plain_overrides)
    full, _ = trainer(run_dir, 2, ["posttrain.stage2.queue_size=256"])  # every extra, the queue too
    plain_rate = pairs_per_second(plain, batch, args.steps)
    full_rate = pairs_per_second(full, batch, args.steps)
    print(json.dumps({"plain_pairs_per_s": round(plain_rate, 1), "stage2_pairs_per_s": round(full_rate, 1)}))

    # FLOPs are counted with eager attention: the CPU sdpa kernel reports none
    counted, _ = trainer(run_dir, 2, [*plain_overrides, "model.attn_implementation=eager"])
    flops = step_flops(counted)
    achieved = flops * plain_rate / batch
    print(json.dumps({
        "flops_per_step": flops,
        "achieved_gflops": round(achieved / 1e9, 2),
        "fraction_of_matmul_peak": round(achieved / peak, 4),
        "stage2_extras_cost": round(plain_rate / full_rate - 1, 3),
    }))


if __name__ == "__main__":
    main()
