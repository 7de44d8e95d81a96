"""Runs stages in order over one run directory, skipping stages whose outputs are current.

A stage is current when every table it writes exists and was made from the same
config sections (the digest in its manifest), or, for a stage with its own `current`
test, when that test says so: pairs and post-training also follow the labelled query set
(`moon ingest-queries`), embed and index the weights that made a store version.
A run whose behaviour log was ingested
(`moon ingest-log`) simulates nothing. Adding a stage to the demo is one line in `DEMO`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from moon import ui
from moon.config import MoonConfig
from moon.ctr import evaluate as ctr_evaluate
from moon.ctr import samples as ctr_samples
from moon.ctr import train as ctr_train
from moon.eval import retrieval, world
from moon.io.tables import has_table, made_with, read_manifest
from moon.pairs import build as pairs
from moon.report import build_report, print_location
from moon.represent import embed_catalogue
from moon.run import RunDir
from moon.sources.log import has_real_log
from moon.sources.simulate.write import OUTPUTS as SIMULATE_OUTPUTS
from moon.sources.simulate.write import SECTIONS as SIMULATE_SECTIONS
from moon.sources.simulate.write import simulate
from moon.sources.summary import print_summary
from moon.store.indexing import index_version
from moon.store.indexing import is_current as index_is_current
from moon.store.versions import Store
from moon.train import posttrain, pretrain


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[MoonConfig, Path], object]
    sections: tuple[str, ...]  # config sections the outputs depend on
    outputs: tuple[str, ...]  # tables the stage writes
    report: Callable[[Path], None] | None = None  # prints what the stage made, after the demo
    current: Callable[[MoonConfig, Path], bool] | None = None  # overrides the manifest digest check
    options: tuple[str, ...] = ()  # keyword options of `pipeline.run` the stage takes (e.g. replace_ingested)
    kept: Callable[[Path], str | None] | None = None  # why the run's outputs must stay, even with --fresh
    unused: Callable[[MoonConfig], str | None] | None = None  # why this config does not need the stage

    def is_current(self, config: MoonConfig, run_dir: Path) -> bool:
        if self.current is not None:
            return self.current(config, run_dir)
        return made_with(run_dir, self.outputs, config.digest(*self.sections))


# Embed and index write no fixed-name table with a config digest: store versions and their
# indexes are named per version. A store version records instead the checkpoint digest of the
# weights that made it, a stricter test than a config digest (it notices any retraining), so
# these two stages say for themselves when they are current: embed when a finished store
# version was made by the stage-2 weights now in the run, index when that version's saved
# index holds every item the version holds.


def embed_stage2(config: MoonConfig, run_dir: Path):
    """The catalogue embedded by the stage-2 model, batch mode (a version it made is reused)."""
    return embed_catalogue(config, run_dir, model="stage2")


def stage2_version(run_dir: Path) -> str | None:
    """The newest store version made by the stage-2 weights now in the run that holds the log's
    queries too (a version made before queries were stored is made again), if any."""
    store = Store(run_dir)
    version = store.made_by(RunDir(run_dir).model("stage2"))
    if version is None or (store.open(version).count("queries") == 0 and has_table(run_dir, "events")):
        return None
    return version


def embed_baseline(config: MoonConfig, run_dir: Path):
    """The catalogue and queries embedded by the non-learned baseline: CUBE's yardstick."""
    return embed_catalogue(config, run_dir, model="baseline")


def _has_baseline_version(config: MoonConfig, run_dir: Path) -> bool:
    store = Store(run_dir)
    return any(store.open(name).manifest.get("model") == "baseline" for name in store.versions())


def index_stage2(config: MoonConfig, run_dir: Path):
    return index_version(run_dir, stage2_version(run_dir), seed=config.seed)


def _stage2_indexed(config: MoonConfig, run_dir: Path) -> bool:
    version = stage2_version(run_dir)
    return version is not None and index_is_current(run_dir, version)


def _real_behaviour(run_dir: Path) -> str | None:
    """A run whose log was ingested simulates nothing: its catalogue and log are the user's."""
    if not has_real_log(run_dir):
        return None
    return (f"[bold]behaviour is real[/bold]: {run_dir}/events was ingested from "
            f"{read_manifest(run_dir, 'events').get('source')}; nothing is simulated")


SIMULATE = Stage("simulate", simulate, SIMULATE_SECTIONS, SIMULATE_OUTPUTS, print_summary,
                 options=("replace_ingested",), kept=_real_behaviour)
DEMO: list[Stage] = [
    SIMULATE,
    Stage("pairs", pairs.build_pairs, pairs.SECTIONS, pairs.OUTPUTS, pairs.print_report, current=pairs.is_current),
    Stage("eval world", world.evaluate, (), (), world.print_saved, current=world.is_current),
    Stage("pretrain", pretrain.pretrain, pretrain.SECTIONS, ("models/pretrain",), unused=pretrain.unused),
    Stage("posttrain stage 1", partial(posttrain.posttrain, stage=1), posttrain.SECTIONS, ("models/stage1",),
          current=partial(posttrain.is_current, stage=1)),
    Stage("posttrain stage 2", partial(posttrain.posttrain, stage=2), posttrain.SECTIONS, ("models/stage2",),
          current=partial(posttrain.is_current, stage=2)),
    Stage("embed", embed_stage2, (), (), current=lambda config, run_dir: stage2_version(run_dir) is not None),
    Stage("index", index_stage2, (), (), current=_stage2_indexed),
    Stage("eval retrieval", retrieval.evaluate, (), (), lambda run_dir: retrieval.print_saved(run_dir)),
    Stage("embed baseline", embed_baseline, (), (), current=_has_baseline_version),
    Stage("ctr build", ctr_samples.build_samples, ctr_samples.SECTIONS, ctr_samples.OUTPUTS,
          current=ctr_samples.is_current),
    Stage("ctr train", ctr_train.train, (), ()),  # always runs: it reuses every run trained before
    Stage("ctr eval", ctr_evaluate.evaluate, (), (), ctr_evaluate.print_saved),
    Stage("report", build_report, (), (), print_location),
]


def run(stages: list[Stage], config: MoonConfig, run_dir: Path, fresh: bool = False, **options) -> None:
    """Runs each stage whose outputs are not current (every stage when `fresh`); `options`
    (e.g. replace_ingested=True) go to the stages that take them."""
    for stage in stages:
        reason = (stage.kept(run_dir) if stage.kept else None) or (stage.unused(config) if stage.unused else None)
        if reason:
            ui.log(reason)
            continue
        if not fresh and stage.is_current(config, run_dir):
            ui.log(f"[dim]{stage.name}: outputs in {run_dir} are current, skipped[/dim]")
            continue
        ui.log(f"[bold cyan]{stage.name}[/bold cyan] -> {run_dir}")
        stage.run(config, run_dir, **{key: value for key, value in options.items() if key in stage.options})


def report(stages: list[Stage], run_dir: Path) -> None:
    for stage in stages:
        if stage.report is not None:
            stage.report(run_dir)
