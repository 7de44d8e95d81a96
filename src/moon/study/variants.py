"""The representation versions a study compares, made in the run's own store.

- A stage of the run (`pretrain`, `stage1`, `stage2`) or a model made without training
  (`baseline`, `random`, `truth`) is embedded as `moon embed --model NAME` would (a finished
  version of the same model is reused).
- `untrained`: the backbone before any training, as `moon eval retrieval` builds it (a tokenizer
  fitted on the catalogue's texts, weights drawn from the config seed), published once to
  `study/models/untrained/`.
- A **variant** is one post-training stage trained again with other settings: stage 1 for a
  share of its steps (`stage1-steps<N>`) or stage 2 with a temporal-negative queue
  (`stage2-queue<Q>`). It trains in its own folder `study/variants/<name>/` that sees the
  run's tables and starting model through symbolic links (nothing of the run is copied or
  changed), and its model is published to `study/models/<name>/`, where the next study finds
  it: a variant whose model was made with the same settings is not trained again, and a killed
  variant resumes from its checkpoint as any training does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from moon import ui
from moon.config import MoonConfig
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.views import ItemViews
from moon.represent import embed_catalogue
from moon.represent.controls import CONTROLS
from moon.run import MANIFEST, MODEL_STAGES, RunDir
from moon.train.loop import publish
from moon.train.posttrain import SECTIONS, STAGES, posttrain

UNTRAINED = "untrained"
SHARED_TABLES = ("items", "pairs_stage1", "pairs_stage2", "near_duplicates", "eval_image_search")


def study_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).root / "study"


def version_of(config: MoonConfig, run_dir: Path, model: str) -> str:
    """The store version of `model` (a stage, a control, `untrained` or a variant's name), embedded
    into the run's store unless a finished version of the very same model is there."""
    if model in CONTROLS or model in MODEL_STAGES:
        source = model
    elif model == UNTRAINED:
        source = str(untrained_model(config, run_dir))
    else:
        source = str(study_dir(run_dir) / "models" / model)
    return embed_catalogue(config, run_dir, model=source).name


def untrained_model(config: MoonConfig, run_dir: Path) -> Path:
    final = study_dir(run_dir) / "models" / UNTRAINED
    if not (final / MANIFEST).is_file():
        views = ItemViews(read_table(run_dir, "items"))
        embedder = Embedder.create(config.model, views.texts(), seed=config.seed)
        publish(embedder.save, final, {"stage": UNTRAINED, "seed": config.seed})
    return final


def token_variants(config: MoonConfig) -> dict[str, MoonConfig]:
    """{name: config} of the shorter stage-1 runs (warmup shortened in proportion)."""
    stage1 = config.posttrain.stage1
    out = {}
    for fraction in config.study.token_fractions:
        steps = max(1, round(stage1.steps * fraction))
        warmup = round(stage1.warmup_steps * fraction)
        out[f"stage1-steps{steps}"] = config.with_overrides(f"posttrain.stage1.steps={steps}",
                                                           f"posttrain.stage1.warmup_steps={warmup}")
    return out


def trained_token_variants(config: MoonConfig, run_dir: Path) -> dict[str, MoonConfig]:
    """The shorter stage-1 runs, each trained unless its model is published; {name: config}."""
    variants = token_variants(config)
    for name, variant in variants.items():
        trained_variant(variant, run_dir, name, stage=1)
    return variants


def queue_variants(config: MoonConfig) -> dict[str, MoonConfig]:
    """{name: config} of the stage-2 runs with a queue; each keeps its entries long enough to fill it."""
    batch = config.posttrain.stage2.batch_size
    return {f"stage2-queue{queue}": config.with_overrides(
        f"posttrain.stage2.queue_size={queue}", f"posttrain.stage2.queue_max_age={max(1, math.ceil(queue / batch))}")
        for queue in config.study.queue_sizes}


def negatives_per_query(config: MoonConfig) -> int:
    return config.posttrain.stage2.batch_size - 1 + config.posttrain.stage2.queue_size


def trained_variant(config: MoonConfig, run_dir: Path, name: str, stage: int) -> Path:
    """The model of a variant, trained if no model of these settings is published."""
    final = study_dir(run_dir) / "models" / name
    digest = config.digest(*SECTIONS)
    if _digest_of(final) == digest:
        return final
    work = study_dir(run_dir) / "variants" / name
    _link_inputs(RunDir(run_dir), RunDir(work), stage)
    ui.log(f"study: training {name}")
    trained = posttrain(config, work, stage)
    if final.exists():
        shutil.rmtree(final)  # a model of other settings
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(trained, final)
    return final


def _digest_of(model: Path) -> str | None:
    manifest = model / MANIFEST
    return json.loads(manifest.read_text()).get("config_digest") if manifest.is_file() else None


def _link_inputs(run: RunDir, work: RunDir, stage: int) -> None:
    """Links the run's tables and the model the stage starts from into the variant's folder."""
    starts_from = [MODEL_STAGES[0]] if stage == 1 else [STAGES[1]]
    links = {work.table(name): run.table(name) for name in SHARED_TABLES if run.has_table(name)}
    links |= {work.model(model): run.model(model) for model in starts_from if run.has_model(model)}
    for link, target in links.items():
        if link.is_symlink() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve(), target_is_directory=True)
