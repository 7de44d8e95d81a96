"""The run directory: every path a stage reads or writes, named once.

Stages talk only through files in one run directory (`runs/<name>/`), so its layout is
the contract between them. Every stage asks a `RunDir` for its paths instead of joining
strings of its own:

    runs/<name>/
      items/ events/ users/ item_truth/       tables of a source (simulate, ingest)
      query_truth/ impression_truth/          the simulator's truth of each query and impression
      rejects.parquet                          catalogue rows `moon ingest` could not use
      log_rejects.parquet                      behaviour-log rows `moon ingest-log` could not use
      labelled_queries/                        a labelled query set a user brought in (moon ingest-queries)
      labelled_queries_rejects.parquet         the rows of that set that could not be used
      pairs_stage1/ pairs_stage2/ eval_image_search/ near_duplicates/   tables of `moon pairs`
      pairs_stats.json                         what each pair-cleaning step kept and dropped
      models/<stage>/                          a published model (pretrain, stage1, stage2)
      train/<stage>/                           its resumable checkpoint and training log
      store/<version>/                         a representation store version
      index/<version>/                         the vector index of a store version
      served_items/                            items added while `moon serve` runs (items schema)
      ctr_samples/ ctr_behaviour/ ctr_queries/ tables of `moon ctr build`
      ctr/<label>-<digest>/seed-<s>/           a trained CTR model, its result and test predictions
      eval/retrieval.json                      recall of every model
      eval/world.json                          photo difficulty and click ceilings of the world
      eval/ctr.json                            CTR metrics, lifts and segments of every CTR model
      eval/predictions/<model>.parquet         each image-search query's top results
      report/report.html, report/metrics.json  the run's report
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"

# The trained models of a run, in training order; each starts from the one before.
MODEL_STAGES = ("pretrain", "stage1", "stage2")


class RunDir:
    """One run directory; every method returns a path inside it (nothing is created)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- tables

    def table(self, name: str) -> Path:
        """A table folder: Parquet shards plus `manifest.json`."""
        return self.root / name

    def has_table(self, name: str) -> bool:
        return (self.table(name) / MANIFEST).is_file()

    @property
    def rejects(self) -> Path:
        return self.root / "rejects.parquet"

    @property
    def labelled_rejects(self) -> Path:
        """Rows of a labelled query set that could not be used (apart from the catalogue's rejects)."""
        return self.root / "labelled_queries_rejects.parquet"

    @property
    def log_rejects(self) -> Path:
        """Behaviour-log rows `moon ingest-log` could not use, with the reason (every part's)."""
        return self.root / "log_rejects.parquet"

    @property
    def pairs_stats(self) -> Path:
        return self.root / "pairs_stats.json"

    # ---- models

    def model(self, stage: str) -> Path:
        """Where the finished model of a training stage is published."""
        return self.root / "models" / stage

    def has_model(self, stage: str) -> bool:
        return (self.model(stage) / MANIFEST).is_file()

    def trained_models(self) -> list[str]:
        """The model stages this run has published, in training order."""
        return [stage for stage in MODEL_STAGES if self.has_model(stage)]

    def latest_model(self) -> str | None:
        """The last trained stage: the model a run serves by default."""
        trained = self.trained_models()
        return trained[-1] if trained else None

    def work(self, stage: str) -> Path:
        """Where a training stage keeps its resumable checkpoint and its log while it runs."""
        return self.root / "train" / stage

    # ---- representations

    @property
    def store(self) -> Path:
        """The representation store: one folder per version."""
        return self.root / "store"

    def index(self, version: str) -> Path:
        """The vector indexes of one store version (`full/`, `dim-<d>/`)."""
        return self.root / "index" / version

    # ---- application

    @property
    def ctr_models(self) -> Path:
        """Trained CTR models: one folder per model and settings, one sub-folder per seed."""
        return self.root / "ctr"

    # ---- evaluation and report

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def retrieval_results(self) -> Path:
        return self.eval / "retrieval.json"

    def retrieval_results_of(self, split: str) -> Path:
        """Recall on the test days (`retrieval.json`, what the report shows) or on another split's."""
        return self.retrieval_results if split == "test" else self.eval / f"retrieval-{split}.json"

    @property
    def world_results(self) -> Path:
        return self.eval / "world.json"

    @property
    def ctr_results(self) -> Path:
        return self.eval / "ctr.json"

    def predictions(self, model: str) -> Path:
        """One model's image-search rankings: query id, top-K item ids and scores."""
        return self.eval / "predictions" / f"{model}.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report"
