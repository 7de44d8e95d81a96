"""Runs stages in order over one run directory, skipping stages whose outputs are current.

A stage is current when every table it writes exists and was made from the same
config sections (the digest in its manifest). Adding a stage to the demo is one line
in `DEMO`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from moon import ui
from moon.config import MoonConfig
from moon.data import pairs
from moon.data.summary import print_summary
from moon.data.tables import has_table, read_manifest
from moon.data.world.simulate import SECTIONS as SIMULATE_SECTIONS
from moon.data.world.simulate import simulate
from moon.eval import image_search
from moon.train import posttrain, pretrain


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[MoonConfig, Path], object]
    sections: tuple[str, ...]  # config sections the outputs depend on
    outputs: tuple[str, ...]  # tables the stage writes
    report: Callable[[Path], None] | None = None  # prints what the stage made, after the demo

    def is_current(self, config: MoonConfig, run_dir: Path) -> bool:
        digest = config.digest(*self.sections)
        return bool(self.outputs) and all(
            has_table(run_dir, table) and read_manifest(run_dir, table).get("config_digest") == digest
            for table in self.outputs
        )


DEMO: list[Stage] = [
    Stage("simulate", simulate, SIMULATE_SECTIONS, ("items", "item_truth", "users", "events"), print_summary),
    Stage("pairs", pairs.build_pairs, pairs.SECTIONS, pairs.OUTPUTS, pairs.print_report),
    Stage("pretrain", pretrain.pretrain, pretrain.SECTIONS, ("models/pretrain",)),
    Stage("posttrain stage 1", partial(posttrain.posttrain, stage=1), posttrain.SECTIONS, ("models/stage1",)),
    Stage("posttrain stage 2", partial(posttrain.posttrain, stage=2), posttrain.SECTIONS, ("models/stage2",)),
    Stage("eval retrieval", image_search.evaluate, (), (), lambda run_dir: image_search.print_saved(run_dir)),
]


def run(stages: list[Stage], config: MoonConfig, run_dir: Path, fresh: bool = False) -> None:
    for stage in stages:
        if not fresh and stage.is_current(config, run_dir):
            ui.log(f"[dim]{stage.name}: outputs in {run_dir} are current, skipped[/dim]")
            continue
        ui.log(f"[bold cyan]{stage.name}[/bold cyan] -> {run_dir}")
        stage.run(config, run_dir)


def report(stages: list[Stage], run_dir: Path) -> None:
    for stage in stages:
        if stage.report is not None:
            stage.report(run_dir)
