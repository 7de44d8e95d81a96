"""The `moon` command: one subcommand per stage, plus `demo` and `config show`.

Every stage command takes -c/--config, --run-dir (default runs/<config name>), --quiet
and trailing `section.key=value` overrides, so stages compose over one run directory.
A user error prints one line and exits with status 2.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import click

from moon import __version__, ui
from moon.config import CTR_MODELS, MoonConfig, load_config, render_yaml
from moon.errors import UserError
from moon.run import RunDir


class UserFacingError(click.ClickException):
    exit_code = 2


class MoonGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise UserFacingError(str(exc)) from None


def stage_command(function):
    """Adds the options every stage shares and hands the command a loaded config and run dir."""

    @click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (default: the embedded demo.yaml)")
    @click.option("--run-dir", type=click.Path(file_okay=False), help="run directory (default: runs/<config name>)")
    @click.option("--quiet", is_flag=True, help="no progress bars or logs, only results")
    @click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
    @functools.wraps(function)
    def wrapper(config_path, run_dir, quiet, overrides, **kwargs):
        ui.set_quiet(quiet)
        config = load_config(config_path, list(overrides))
        return function(config=config, run_dir=Path(run_dir or Path("runs") / config.name), **kwargs)

    return wrapper


@click.group(cls=MoonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moon")
def cli():
    """MOON: multimodal representations for e-commerce search advertising.

    Stages read and write tables in one run directory (runs/<name>/), so they compose:
    simulate or ingest a catalogue, then run the later stages over it.
    """


REPLACE_INGESTED = click.option(
    "--replace-ingested", is_flag=True,
    help="let a simulated world replace a catalogue or log ingested into the run directory (it is lost)")


@cli.command()
@click.option("--catalog", type=click.Path(file_okay=False), help="run directory of an ingested real catalogue to simulate behaviour over")
@REPLACE_INGESTED
@stage_command
def simulate(config: MoonConfig, run_dir: Path, catalog: str | None, replace_ingested: bool):
    """Simulate an e-commerce world: catalogue, users, search sessions, clicks and purchases."""
    from moon.sources.simulate.write import simulate as run_simulation
    from moon.sources.summary import print_summary

    if catalog:
        config = config.model_copy(update={"behaviour": config.behaviour.model_copy(update={"catalog": catalog})})
    counts = run_simulation(config, run_dir, replace_ingested=replace_ingested)
    ui.log(f"simulated {counts['items']:,} items and {counts['events']:,} events in {counts['seconds']:.1f}s")
    print_summary(run_dir)


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["auto", "kaggle", "parquet", "csv", "jsonl"]), help="source layout (default: ingest.format, auto-detected)")
@stage_command
def ingest(config: MoonConfig, run_dir: Path, source: str, fmt: str | None):
    """Ingest a real catalogue (Kaggle fashion layout, Parquet, CSV or JSONL + images) as the items table."""
    from moon.sources.catalogue import ingest as run_ingest

    summary = run_ingest(Path(source), config, run_dir, fmt)
    ui.print_table(f"ingested {source} -> {run_dir}", summary.rows(), ("", "rows"))


@cli.command("ingest-queries")
@click.argument("source", type=click.Path())
@stage_command
def ingest_queries(config: MoonConfig, run_dir: Path, source: str):
    """Ingest a labelled query set (CSV or JSONL: query_text and/or query_image, item_ids, split); it replaces
    the run's labelled set. Its train split joins both post-training stages, its test split `moon eval retrieval`."""
    from moon.sources.labelled import ingest_queries as run_ingest

    summary = run_ingest(Path(source), config, run_dir)
    ui.print_table(f"labelled queries {source} -> {run_dir}", summary.rows(), ("", "rows"))
    if summary.replaced:
        click.echo(summary.replaced)


@cli.command("ingest-log")
@click.argument("source", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["auto", "ubi", "events", "taobao"]), default="auto",
              help="ubi: a folder with queries.jsonl + events.jsonl; events: MOON's events columns as Parquet or "
              "CSV; taobao: the UserBehavior CSV (default: detected)")
@stage_command
def ingest_log(config: MoonConfig, run_dir: Path, source: str, fmt: str):
    """Ingest a real behaviour log over the run's catalogue as the events table (appends; bad rows go to
    log_rejects.parquet)."""
    from moon.sources.log import ingest_log as run_ingest

    summary = run_ingest(Path(source), config, run_dir, fmt)
    ui.print_table(f"ingested {source} ({summary.format}) -> {run_dir}", summary.rows(), ("", "rows"))
    ui.log(f"rejected rows and their reasons -> {RunDir(run_dir).log_rejects}")


@cli.command("export-log")
@click.option("--format", "fmt", type=click.Choice(["ubi"]), default="ubi", show_default=True,
              help="the log format to write")
@click.option("--out", type=click.Path(file_okay=False), help="folder to write (default: <run-dir>/export/ubi)")
@stage_command
def export_log(config: MoonConfig, run_dir: Path, fmt: str, out: str | None):
    """Write the run's behaviour log in UBI 1.3 (queries.jsonl + events.jsonl), readable by `moon ingest-log`."""
    from moon.sources.ubi import export_log as run_export

    folder = Path(out) if out else run_dir / "export" / fmt
    counts = run_export(run_dir, folder)
    click.echo(f"{counts['queries']:,} queries and {counts['events']:,} events -> {folder}")


@cli.command()
@stage_command
def pairs(config: MoonConfig, run_dir: Path):
    """Build stage-1 and stage-2 post-training pairs and the image-search evaluation set from the log."""
    from moon.pairs.build import build_pairs, print_report

    build_pairs(config, run_dir)
    print_report(run_dir)


@cli.command()
@stage_command
def pretrain(config: MoonConfig, run_dir: Path):
    """Pretrain the backbone on product tasks from the catalogue (next-token prediction)."""
    from moon.train.pretrain import pretrain as run_pretrain

    ui.log(f"pretrained model -> {run_pretrain(config, run_dir)}")


@cli.command()
@click.option("--stage", type=click.IntRange(1, 2), required=True, help="1: nine mixed-modality tasks; 2: purchases with hard and spatial-temporal negatives")
@stage_command
def posttrain(config: MoonConfig, run_dir: Path, stage: int):
    """Post-train the embedder contrastively on the pair tables (run under torchrun for several processes)."""
    from moon.train.posttrain import posttrain as run_posttrain

    ui.log(f"stage-{stage} embedder -> {run_posttrain(config, run_dir, stage)}")


@cli.command()
@click.option("--model", help="stage (stage2, stage1, pretrain), model directory, or a model made without training: "
              "baseline (the non-learned baseline), random (placebo), truth (the simulated world's oracle) "
              "(default: the latest trained stage; with --incremental: the model that made the version)")
@click.option("--incremental", is_flag=True, help="embed only the catalogue items and log queries the version lacks "
              "and add them to it")
@click.option("--version", "version", help="store version to make or resume (default: the unfinished or current one "
              "of this model and catalogue, else a new v<N>-<model>); with --incremental, the one to add to")
@stage_command
def embed(config: MoonConfig, run_dir: Path, model: str | None, incremental: bool, version: str | None):
    """Embed the catalogue and the log's queries into a representation store version (resumable; run under
    torchrun for several processes)."""
    from moon.represent import embed_catalogue

    stored = embed_catalogue(config, run_dir, model=model, version=version, incremental=incremental)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        click.echo(f"store version {stored.path}: {len(stored):,} items, {stored.count('queries'):,} queries")


@cli.command()
@click.option("--version", "version", help="store version to index (default: the latest)")
@click.option("--kind", type=click.Choice(["auto", "exact", "hnsw", "ivfpq"]), default="auto", show_default=True,
              help="index kind; auto: exact up to 50k items, HNSW up to 2M, IVF-PQ above; "
              "a kind other than the saved index's rebuilds it")
@click.option("--per-dim", is_flag=True, help="also index every Matryoshka dimension (index/<version>/dim-<d>/)")
@click.option("--rebuild", is_flag=True, help="build from scratch even where a saved index could be extended")
@stage_command
def index(config: MoonConfig, run_dir: Path, version: str | None, kind: str, per_dim: bool, rebuild: bool):
    """Build the vector index of a store version, or add the items it lacks (after `moon embed --incremental`)."""
    from moon.store.indexing import index_version, print_results, summary

    stored, results = index_version(run_dir, version, kind, per_dim, rebuild, config.seed)
    print_results(stored, results)
    click.echo(summary(stored, results))


@cli.command()
@click.option("--to", "target", nargs=2, type=(click.Choice(["milvus"]), str), required=True,
              metavar="milvus URI", help="where to write: milvus and a Milvus URI (a path ending in .db: Milvus Lite "
              "in this process; http://host:19530: a Milvus server or cluster)")
@click.option("--version", "version", help="store version to export (default: the latest)")
@click.option("--alias", default="moon_items", show_default=True, help="the alias searches go through; it moves to "
              "the exported version once that is loaded and answers")
@click.option("--dim", type=int, help="Matryoshka dimension to export (default: the full dimension)")
@stage_command
def export(config: MoonConfig, run_dir: Path, target: tuple[str, str], version: str | None, alias: str,
           dim: int | None):
    """Write a store version into a vector database, one collection per version, and point an alias at it."""
    from moon.store.milvus import export_version

    done = export_version(run_dir, version, target[1], alias=alias, dim=dim)
    click.echo(f"{done['version']}: {done['count']:,} items of {done['dim']} dims -> Milvus collection "
               f"{done['collection']} at {done['uri']} ({done['action']}, {done['seconds']:.1f}s); "
               f"alias {done['alias']} -> {done['collection']} (was {done['previous'] or 'unset'})")


@cli.group(cls=MoonGroup, name="eval")
def evaluate():
    """Offline metrics of the run's models."""


@evaluate.command("retrieval")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True,
              help="the days whose queries are searched: test to measure, valid to choose a recipe by")
@stage_command
def eval_retrieval(config: MoonConfig, run_dir: Path, split: str):
    """Image-based search recall@K of every model in the run, per Matryoshka dimension, with 95% CIs."""
    from moon.eval.retrieval import evaluate as run_eval
    from moon.eval.retrieval import print_results

    print_results(run_eval(config, run_dir, split=split))
    ui.log(f"results -> {RunDir(run_dir).retrieval_results_of(split)}")


@evaluate.command("world")
@stage_command
def eval_world(config: MoonConfig, run_dir: Path):
    """How hard the world is, without a trained model: the baseline on shopper photos among 81 items
    beside real shop photos, and the click ceilings on the simulator's truth (after `moon pairs`)."""
    from moon.eval.world import evaluate as run_eval
    from moon.eval.world import print_results

    print_results(run_eval(config, run_dir))
    ui.log(f"results -> {RunDir(run_dir).world_results}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on; any other than loopback "
              "needs MOON_ADMIN_KEY (or --no-admin)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="port to listen on")
@click.option("--model", help="serving model: a stage (stage2, stage1, pretrain) or a model directory (default: the "
              "latest trained stage)")
@click.option("--version", "version", help="store version to serve first (default: the newest the model made)")
@click.option("--engine", type=click.Choice(["faiss", "milvus"]), default="faiss", show_default=True,
              help="where searches go: the version's faiss index, or a Milvus collection (`moon export --to milvus`)")
@click.option("--milvus-uri", help="with --engine milvus: a Milvus Lite folder (*.db) or http://host:19530")
@click.option("--milvus-alias", help="with --engine milvus: the alias searches go through (default: moon_items)")
@click.option("--watch", is_flag=True, help="reload when the model makes a newer store version (every "
              "serve.watch_interval seconds)")
@click.option("--no-admin", "no_admin", is_flag=True, help="leave out the admin routes (reload, new items)")
@stage_command
def serve(config: MoonConfig, run_dir: Path, host: str, port: int, model: str | None, version: str | None,
          engine: str, milvus_uri: str | None, milvus_alias: str | None, watch: bool, no_admin: bool):
    """Serve the run over HTTP: embed, search, lookup, versions, zero-downtime reload, real-time items (/docs)."""
    from moon.serve.server import serve as run_server

    run_server(config, run_dir, host, port, model, version, engine, milvus_uri, milvus_alias, watch, not no_admin)


@cli.command()
@stage_command
def report(config: MoonConfig, run_dir: Path):
    """Write the run's report: one HTML page (data, pairs, training curves, recall, image-search gallery) and metrics.json."""
    from moon.report import build_report

    path = build_report(config, run_dir)
    click.echo(f"report -> {path} (metrics: {path.with_name('metrics.json')})")


@cli.group(cls=MoonGroup)
def ctr():
    """CTR prediction over stored representations: samples, models (ID-only DNN, DIN, CUBE), evaluation."""


@ctr.command("build")
@stage_command
def ctr_build(config: MoonConfig, run_dir: Path):
    """Build CTR samples (one per impression) and the per-user behaviour side tables from the log."""
    from moon.ctr.samples import build_samples

    build_samples(config, run_dir)


@ctr.command("train")
@click.option("--model", "models", multiple=True, type=click.Choice(CTR_MODELS),
              help="model to train (repeatable; default: ctr.models)")
@stage_command
def ctr_train(config: MoonConfig, run_dir: Path, models: tuple[str, ...]):
    """Train CTR models, one run per seed of ctr.seeds; runs trained before are reused (torchrun for several processes)."""
    from moon.ctr.train import train

    for folder in train(config, run_dir, list(models) or None):
        ui.log(f"[dim]{folder}[/dim]")


@ctr.command("eval")
@stage_command
def ctr_eval(config: MoonConfig, run_dir: Path):
    """Score every trained CTR model on the test days: AUC, gAUC, logloss with CIs, lifts over DIN, segments."""
    from moon.ctr.evaluate import evaluate as run_eval
    from moon.ctr.evaluate import print_results

    print_results(run_eval(config, run_dir))
    ui.log(f"results -> {RunDir(run_dir).ctr_results}")


@cli.group(cls=MoonGroup)
def study():
    """Studies across representation versions: the exchange rate and scaling laws (see configs/study.yaml)."""


@study.command("exchange-rate")
@stage_command
def study_exchange_rate(config: MoonConfig, run_dir: Path):
    """Which intermediate metric predicts CUBE's CTR gain: versions along several axes, their recall and ΔAUC."""
    from moon.report.build import build_report
    from moon.study import report
    from moon.study.exchange_rate import results_path, study_exchange_rate

    report.print_exchange_rate(study_exchange_rate(config, run_dir))
    ui.log(f"results -> {results_path(run_dir)}; report -> {build_report(config, run_dir)}")


@study.command("ablation")
@stage_command
def study_ablation(config: MoonConfig, run_dir: Path):
    """What each part of CUBE buys: CUBE with each part off, over the oracle's, stage 2's and the baseline's vectors."""
    from moon.study.ablation import print_ablation, results_path, study_ablation

    print_ablation(study_ablation(config, run_dir))
    ui.log(f"results -> {results_path(run_dir)}")


@study.command("scaling")
@stage_command
def study_scaling(config: MoonConfig, run_dir: Path):
    """Scaling curves over training tokens, negatives per query and behaviour length."""
    from moon.report.build import build_report
    from moon.study import report
    from moon.study.scaling import results_path, study_scaling

    report.print_scaling(study_scaling(config, run_dir))
    ui.log(f"results -> {results_path(run_dir)}; report -> {build_report(config, run_dir)}")


@cli.command()
@click.option("--fresh", is_flag=True, help="re-run every stage even if its outputs are current "
              "(an ingested catalogue or log is kept: see --replace-ingested)")
@REPLACE_INGESTED
@stage_command
def demo(config: MoonConfig, run_dir: Path, fresh: bool, replace_ingested: bool):
    """Run the whole pipeline on the embedded simulated world and print what it made."""
    from moon import pipeline

    started = time.perf_counter()
    pipeline.run(pipeline.DEMO, config, run_dir, fresh=fresh, replace_ingested=replace_ingested)
    pipeline.report(pipeline.DEMO, run_dir)
    ui.log(f"demo finished in {time.perf_counter() - started:.1f}s; tables are in {run_dir}/")


@cli.group(cls=MoonGroup)
def config():
    """Inspect the configuration."""


@config.command("show")
@stage_command
def config_show(config: MoonConfig, run_dir: Path):
    """Print the resolved config (file + overrides), each key with its description."""
    click.echo(render_yaml(config))


def main() -> None:
    cli(prog_name="moon")
