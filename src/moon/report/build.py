"""`moon report`: one self-contained HTML page about a run, plus its headline numbers as JSON.

The page reads only what the run directory holds (tables, `pairs_stats.json`, training logs,
`eval/world.json`, `eval/retrieval.json`, `eval/ctr.json`, models, store versions), so it can be built at any point of a run: a
piece that is not there yet is a short note naming the command that makes it. Plots and
images are embedded as base64, so `report/report.html` can be mailed or archived alone;
`report/metrics.json` holds the same headline numbers for machines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from moon import ui
from moon.config import MoonConfig
from moon.errors import UserError
from moon.io.atomic import atomic_file, atomic_json
from moon.io.tables import has_table, read_manifest, utc_now
from moon.pairs.accounting import Accounting, Step
from moon.report import ctr, gallery, recall, study, training, world
from moon.report.html import Html, Section, not_run, note, page, table, text
from moon.run import RunDir
from moon.sources.log import has_real_log
from moon.sources.summary import summarize

HTML_FILE = "report.html"
METRICS_FILE = "metrics.json"
REAL_CATALOGUE = "behaviour is simulated over a real catalogue"
REAL_BEHAVIOUR = "real behaviour"


def report_path(run_dir: Path) -> Path:
    return RunDir(run_dir).report / HTML_FILE


def build_report(config: MoonConfig, run_dir: Path) -> Path:
    """Writes report/report.html and report/metrics.json into the run directory; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: run `moon simulate --run-dir {run_dir}` first")
    sections = [
        data_section(run_dir),
        pairs_section(run_dir),
        world.section(run_dir),
        training.section(config, run_dir),
        recall.section(run_dir),
        gallery.section(config, run_dir),
        ctr.section(run_dir),
        study.section(run_dir),
    ]
    created = utc_now()
    metrics: dict = {"run_dir": str(run_dir), "created_at": created}
    for section in sections:
        metrics.update(section.metrics)
    header = f"<p>Run directory <code>{text(run_dir)}</code>, report made {text(created)}.</p>"
    out = RunDir(run_dir).report
    out.mkdir(parents=True, exist_ok=True)
    atomic_json(out / METRICS_FILE, metrics)
    atomic_file(out / HTML_FILE, page(f"MOON report: {run_dir.name}", header, sections))
    return out / HTML_FILE


def print_location(run_dir: Path) -> None:
    """The report's path and size, after `moon demo`."""
    path = report_path(run_dir)
    ui.out.print(f"report: {path} ({path.stat().st_size / 1024:,.0f} KiB)", soft_wrap=True, highlight=False)




# ---------------------------------------------------------------- data summary


def data_section(run_dir: Path) -> Section:
    """What `moon simulate` prints, plus where the catalogue and the behaviour came from."""
    title = "Data summary"
    if not has_table(run_dir, "items"):
        return Section("data-summary", title, not_run("no catalogue", "moon simulate") + note(
            "or ingest a real one: `moon ingest SOURCE`"))
    rows = summarize(run_dir)
    counts = dict(rows)
    if "image queries (user photos)" in counts:
        queries = counts["text queries"] + counts["image queries (user photos)"]
        rows.append(("share of image queries", counts["image queries (user photos)"] / max(queries, 1)))
    rejects = RunDir(run_dir).rejects
    if rejects.exists():
        rows.append(("ingest rejects (rejects.parquet)", pq.read_metadata(rejects).num_rows))
    origin, body = provenance(run_dir)
    body += table(("", "value"), rows)
    return Section("data-summary", title, body, {"data": {**dict(rows), **origin}})


def provenance(run_dir: Path) -> tuple[dict, str]:
    """Whether the catalogue is real or drawn, and the behaviour simulated: stated where a reader looks first."""
    items = read_manifest(run_dir, "items")
    real = items.get("simulated") is False
    log = read_manifest(run_dir, "events") if has_table(run_dir, "events") else None
    origin = {"catalogue": "real" if real else "simulated",
              "behaviour": None if log is None else "real" if has_real_log(run_dir) else "simulated"}
    if log is None:
        command = f"moon simulate --catalog {run_dir} --run-dir {run_dir}" if real else "moon simulate"
        return origin, not_run("no behaviour log", command)
    if origin["behaviour"] == "real":
        parts = ", ".join(f"{part['source']} ({part['format']}, {part['kept']:,} events kept, {part['rejected']:,} "
                          "rejected)" for part in log.get("parts", []))
        return origin, (f'<p class="real">{REAL_BEHAVIOUR}: the behaviour log was ingested from {text(parts)}; '
                        "no behaviour was simulated.</p>")
    if not real:
        return origin, "<p>A simulated world: the catalogue and the behaviour log are both drawn by the simulator.</p>"
    source = items.get("catalog") or read_manifest(run_dir, "events").get("catalog") or "an ingested catalogue"
    filled = items.get("simulated_columns") or []
    extra = f" (the simulator filled in: {', '.join(filled)})" if filled else ""
    return origin, f'<p class="real">{REAL_CATALOGUE}: {text(source)}{text(extra)}</p>'


# ---------------------------------------------------------------- pair accounting


def pairs_section(run_dir: Path) -> Section:
    """Every cleaning step's rows in, kept and dropped by reason, and the pairs per split and task."""
    title = "Pair accounting"
    path = RunDir(run_dir).pairs_stats
    if not path.exists():
        return Section("pair-accounting", title, not_run("no post-training pairs", "moon pairs"))
    stats = json.loads(path.read_text())
    steps = [Step(**step) for step in stats.get("steps", [])]
    rows = [(*Accounting.row(step)[:4], Html.num(f"{step.kept / step.rows_in:.1%}" if step.rows_in else "-"),
             Accounting.row(step)[4]) for step in steps]
    parts = [table(("stage", "step", "rows in", "kept", "kept share", "dropped: reason"), rows)]
    totals = stats.get("totals", {})
    for output, counts in totals.items():
        parts.append(f"<h3>{text(output)}</h3>")
        parts.append(table(("", "seconds" if output == "seconds" else "rows"), [(k, v) for k, v in counts.items()]))
    metrics = {"pairs": {"steps": [vars(step) for step in steps], "totals": totals}}
    return Section("pair-accounting", title, "\n".join(parts), metrics)

