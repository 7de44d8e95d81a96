"""Post-training speed of the tiny preset, every figure a ratio to a baseline measured in the same run.

Default mode, stage 2's step: pairs/s of a plain in-batch InfoNCE step and of the full stage-2
step (hard negatives, queue, gather, descriptor distillation) of the same model, on inputs
prepared beforehand; their ratio is the cost of stage 2's extras (each of `--repeats` runs
reported). Also the achieved FLOP/s of the plain step against this machine's matmul peak.

`--levers`: the stage-1 step as it trains today against the same step with one lever changed,
each alternated with today's over `--repeats` runs on the same inputs: bfloat16 autocast, the
rotary positions recomputed by the library on every batch (the step caches them per layout),
AdamW's per-tensor loop (the step uses the fused kernel), a shorter text budget, and
`torch.compile` of the LLM (its first step, which compiles, is reported apart); also the share
of a step that preparing its inputs (augmentation, decoding, collation) costs.

`--loop`: the whole post-training loop against the bare step. The loop is `moon posttrain
--stage 1` itself (input workers, augmentation, collation, logging, checkpoints), run for
`--steps` steps in a scratch run directory over this run's tables; its pairs/s is read from
its training log (the first logged interval, which starts the workers, left out). The bare
step is the same model, loss and optimiser on the same steps' inputs prepared beforehand.

    python benchmarks/train.py [--run-dir runs/demo] [--steps 40] [--repeats 3]
    python benchmarks/train.py --levers [--run-dir runs/demo] [--steps 20] [--repeats 3]
    python benchmarks/train.py --loop [--run-dir runs/demo] [--steps 150] [posttrain.stage1.input_workers=1 ...]

Needs a run directory with pair tables (`moon demo` makes runs/demo). Prints JSON lines;
the last is the headline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from moon import ui
from moon.config import load_config
from moon.io.tables import has_table, read_table
from moon.model.embedder import Embedder
from moon.model.views import ItemViews
from moon.run import RunDir
from moon.train import posttrain as recipe
from moon.train.distill import DescriptorDistillation
from moon.train.loop import Processes, optimiser, read_log
from moon.train.losses import PosttrainLoss, TaskTemperatures
from moon.train.negatives import EmbeddingQueue

TABLES = ("items", "near_duplicates", "pairs_stage1", "pairs_stage2")


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul: the most this CPU does for a model's linear layers."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class BareStep:
    """One post-training stage's model, loss and optimiser, stepping over inputs prepared beforehand:
    what `moon posttrain` does per step, less preparing the inputs."""

    def __init__(self, run_dir: Path, stage: int, overrides: list[str]):
        config = load_config(None, overrides)
        settings = getattr(config.posttrain, f"stage{stage}")
        items = ItemViews(read_table(run_dir, "items"))
        augment_size = config.model.image_size if settings.augment_images else None
        pairs = recipe.PairTable(recipe.train_pairs(run_dir, stage), items, recipe.product_keys(run_dir, items),
                                 settings.catalogue_pairs, augment_size, settings.restage_images)
        self.embedder = Embedder.create(config.model, [*items.texts(), *pairs.text_corpus()], seed=config.seed)
        temperatures = TaskTemperatures(recipe.schema.TASKS, settings.temperature)
        distillation = None
        if settings.distill_weight:
            distillation = DescriptorDistillation.for_catalogue(items.images, self.embedder.dim,
                                                                settings.distill_temperature)
        dims = sorted({*self.embedder.settings.matryoshka_dims, self.embedder.dim})
        loss = PosttrainLoss(temperatures, dims, settings.matryoshka_weights, settings.task_weights, distillation,
                             settings.distill_weight, settings.symmetric)
        queue = EmbeddingQueue(settings.queue_size, settings.queue_max_age)
        self.step = recipe.ContrastiveStep(self.embedder, self.embedder, loss, queue, settings, Processes())
        self.settings = settings
        self.rebuild_optimiser()
        self.inputs = recipe.StepInputs(pairs, self.embedder.collate, settings, config.seed, stage, Processes())
        self.batch_size = settings.batch_size

    def rebuild_optimiser(self, fused: bool | None = None) -> None:
        self.optim, self.schedule = optimiser([*self.embedder.parameters(), *self.step.heads], self.settings,
                                              fused=fused)

    def compile_language_model(self) -> None:
        backbone = self.embedder.backbone
        backbone.language_model = torch.compile(backbone.language_model, dynamic=True)

    def prepare(self, steps: range) -> list[recipe.Batch]:
        return [self.inputs[step] for step in steps]

    def run(self, step: int, batch: recipe.Batch) -> None:
        self.step(batch, step)
        torch.nn.utils.clip_grad_norm_([*self.embedder.parameters(), *self.step.heads], 1.0)
        self.optim.step()
        self.schedule.step()
        self.optim.zero_grad(set_to_none=True)

    def pairs_per_second(self, steps: range) -> float:
        """Pairs/s over `steps`, after one untimed warm-up step."""
        batches = self.prepare(range(steps.start - 1, steps.stop))
        self.run(steps.start - 1, batches[0])
        start = time.perf_counter()
        for step, batch in zip(steps, batches[1:]):
            self.run(step, batch)
        return len(steps) * self.batch_size / (time.perf_counter() - start)

    def flops(self, step: int) -> int:
        batch = self.inputs[step]
        with FlopCounterMode(display=False) as counter:
            self.run(step, batch)
        return counter.get_total_flops()


def windows(steps: int, repeats: int) -> list[range]:
    """`repeats` runs of `steps` timed steps each, on fresh step numbers (a warm-up step before each)."""
    return [range(1 + repeat * (steps + 1), (repeat + 1) * (steps + 1)) for repeat in range(repeats)]


def stage2_extras(run_dir: Path, steps: int, repeats: int) -> None:
    peak = matmul_peak()
    print(json.dumps({"matmul_peak_gflops": round(peak / 1e9, 1)}))
    # plain in-batch InfoNCE on the stage-2 pairs: no hard negatives, no queue, no distillation
    # (both on the behaviour pairs alone, as the stage-2 pair table has them)
    behaviour = ["posttrain.stage2.catalogue_pairs=0", "posttrain.stage2.augment_images=false"]
    plain_overrides = [*behaviour, "posttrain.stage2.hard_negatives=0", "posttrain.stage2.queue_size=0",
                       "posttrain.stage2.distill_weight=0"]
    plain = BareStep(run_dir, 2, plain_overrides)
    full = BareStep(run_dir, 2, [*behaviour, "posttrain.stage2.queue_size=256"])  # every extra, the queue too
    costs = []
    for repeat, window in enumerate(windows(steps, repeats)):  # alternated: a slow spell hits both
        plain_rate, full_rate = plain.pairs_per_second(window), full.pairs_per_second(window)
        costs.append(plain_rate / full_rate - 1)
        print(json.dumps({"run": repeat + 1, "plain_pairs_per_s": round(plain_rate, 1),
                          "stage2_pairs_per_s": round(full_rate, 1), "stage2_extras_cost": round(costs[-1], 3)}))

    # FLOPs are counted with eager attention: the CPU sdpa kernel reports none
    flops = BareStep(run_dir, 2, [*plain_overrides, "model.attn_implementation=eager"]).flops(0)
    achieved = flops * plain_rate / plain.batch_size
    print(json.dumps({
        "flops_per_step": flops,
        "achieved_gflops": round(achieved / 1e9, 2),
        "fraction_of_matmul_peak": round(achieved / peak, 4),
        "stage2_extras_cost_runs": [round(cost, 3) for cost in costs],
        "stage2_extras_cost_median": round(statistics.median(costs), 3),
    }))


LEVERS = {  # lever -> (config overrides, change to the built step): each against today's step
    "bfloat16 autocast": (["model.dtype=bfloat16"], None),
    "rotary positions per batch (library)": ([], lambda bare: setattr(bare.embedder, "positions", lambda batch: None)),
    "AdamW per-tensor loop": ([], lambda bare: bare.rebuild_optimiser(fused=False)),
    "text budget 32 tokens (48 today)": (["model.max_text_tokens=32"], None),
    "torch.compile of the LLM (dynamic shapes)": ([], lambda bare: bare.compile_language_model()),
}


def levers(run_dir: Path, steps: int, repeats: int) -> None:
    """Stage 1's bare step today against each lever, alternated; ratio > 1: the lever is faster."""
    overrides = ["posttrain.from_pretrained=false"]
    today = BareStep(run_dir, 1, overrides)
    prepare = []
    for window in windows(steps, repeats):
        start = time.perf_counter()
        today.prepare(window)
        prepare.append((time.perf_counter() - start) / len(window))
    step_seconds = today.batch_size / today.pairs_per_second(range(1, steps + 1))
    print(json.dumps({"input_preparation_ms_per_step": round(1e3 * statistics.median(prepare), 1),
                      "model_step_ms": round(1e3 * step_seconds, 1),
                      "preparation_share": round(statistics.median(prepare) / (statistics.median(prepare) + step_seconds), 3)}))
    summary = {}
    for name, (lever_overrides, change) in LEVERS.items():
        lever = BareStep(run_dir, 1, [*overrides, *lever_overrides])
        if change:
            change(lever)
        start = time.perf_counter()
        lever.run(0, lever.prepare(range(1))[0])  # the first step pays for any compilation
        first_step = time.perf_counter() - start
        ratios = []
        for repeat, window in enumerate(windows(steps, repeats)):  # alternated: a slow spell hits both
            today_rate, lever_rate = today.pairs_per_second(window), lever.pairs_per_second(window)
            ratios.append(lever_rate / today_rate)
            print(json.dumps({"lever": name, "run": repeat + 1, "today_pairs_per_s": round(today_rate, 1),
                              "lever_pairs_per_s": round(lever_rate, 1), "speed_ratio": round(ratios[-1], 3)}))
        summary[name] = {"speed_ratio": round(statistics.median(ratios), 3), "first_step_s": round(first_step, 2)}
    print(json.dumps({"steps": steps, "lever_speed_ratio_median": summary}))


def whole_loop(run_dir: Path, steps: int, repeats: int, extra: list[str]) -> None:
    """`moon posttrain --stage 1` against its bare step, alternated `repeats` times."""
    log_every = max(1, steps // 6)
    overrides = ["posttrain.from_pretrained=false", f"posttrain.stage1.steps={steps}",
                 f"posttrain.stage1.log_every={log_every}", *extra]
    bare = BareStep(run_dir, 1, overrides)
    ratios = []
    for repeat in range(repeats):
        bare_rate = bare.pairs_per_second(range(log_every + 1, steps))
        loop_rate = loop_pairs_per_second(run_dir, load_config(None, overrides))
        ratios.append(loop_rate / bare_rate)
        print(json.dumps({"run": repeat + 1, "bare_step_pairs_per_s": round(bare_rate, 1),
                          "loop_pairs_per_s": round(loop_rate, 1), "loop_vs_bare_step": round(ratios[-1], 3)}))
    print(json.dumps({"steps": steps, "batch_size": bare.batch_size,
                      "input_workers": load_config(None, overrides).posttrain.stage1.input_workers,
                      "loop_vs_bare_step_runs": [round(r, 3) for r in ratios],
                      "loop_vs_bare_step_median": round(statistics.median(ratios), 3)}))


def loop_pairs_per_second(run_dir: Path, config) -> float:
    """Pairs/s of `moon posttrain --stage 1` in a scratch run over this run's tables, from its log."""
    with tempfile.TemporaryDirectory() as scratch:
        for table in TABLES:
            if has_table(run_dir, table):
                (Path(scratch) / table).symlink_to((run_dir / table).resolve())
        recipe.posttrain(config, Path(scratch), stage=1)
        log = read_log(RunDir(scratch).work("stage1"))
    return statistics.mean(record["pairs_per_s"] for record in log[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--loop", action="store_true", help="the whole post-training loop against the bare step")
    parser.add_argument("--levers", action="store_true", help="stage 1's step against each speed lever")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 40; --levers: 20; --loop: 150)")
    parser.add_argument("--repeats", type=int, default=3, help="runs, alternated with their baseline")
    parser.add_argument("overrides", nargs="*", help="config overrides for the loop and its bare step")
    args = parser.parse_args()
    ui.set_quiet(True)
    if args.levers:
        levers(Path(args.run_dir), args.steps or 20, args.repeats)
    elif args.loop:
        whole_loop(Path(args.run_dir), args.steps or 150, args.repeats, args.overrides)
    else:
        stage2_extras(Path(args.run_dir), args.steps or 40, args.repeats)


if __name__ == "__main__":
    main()
