"""The report's CTR section: `eval/ctr.json` as tables (metrics with intervals and lifts over DIN,
lift per segment, and on a simulated log the click ceilings beside them) and a plot of the
lift per segment."""

from __future__ import annotations

import json
from pathlib import Path

from moon.report import plots
from moon.report.html import Html, Section, not_run, table, text, value_with_ci
from moon.report.world import ceilings_table
from moon.run import RunDir

TITLE = "CTR prediction"


def section(run_dir: Path) -> Section:
    path = RunDir(run_dir).ctr_results
    if not path.is_file():
        return Section("ctr", TITLE, not_run("no CTR results", "moon ctr build && moon ctr train && moon ctr eval"))
    results = json.loads(path.read_text())
    base = results["base"]
    intro = (f"<p>{results['test_rows']:,} impressions ({results['test_clicks']:,} clicks) on the test days "
             f"{text(', '.join(results['test_days']))}, which no representation model trained on. Each figure is "
             "the mean over seeds; the interval is one run's (the first seed's) 95% interval on the test set; "
             f"the noise is the spread of a difference between one run of each model over seeds "
             f"(docs/metrics.md).</p>")
    rows = []
    for name, model in results["models"].items():
        lift = model.get("lift", {}).get("auc", {})
        rows.append((name, len(model["seeds"]), Html.num(value_with_ci(model["auc"]["mean"], model["auc"]["ci_first_seed"])),
                     _or_dash(model["auc"]["seed_std"]), _or_dash(model["gauc_user"]["mean"]),
                     _or_dash(model["gauc_request"]["mean"]), model["logloss"]["mean"],
                     _signed(lift.get("delta")), _or_dash(lift.get("noise_floor"))))
    parts = [intro, table(("model", "seeds", "AUC [95% CI]", "seed std", "gAUC user", "gAUC request", "logloss",
                           f"ΔAUC vs {base}", "noise"), rows)]
    lifted = {name: model["segment_lift"] for name, model in results["models"].items() if model.get("segment_lift")}
    if lifted:
        segments = list(next(iter(lifted.values())))
        rows = [(segment, results["segments"].get(segment, 0),
                 *(_signed(lifts.get(segment, {}).get("delta_auc")) for lifts in lifted.values())) for segment in segments]
        parts += [f"<h3>ΔAUC over {text(base)} by segment</h3>", table(("segment", "test rows", *lifted), rows)]
        parts.append(plots.segment_lifts(f"ΔAUC over {base} by segment",
                                         {name: {s: v["delta_auc"] for s, v in lifts.items()} for name, lifts in lifted.items()}))
    if "ceilings" in results:
        parts.append(ceilings_table(results["ceilings"]))
    return Section("ctr", TITLE, "\n".join(parts), {"ctr": results})


def _signed(value) -> object:
    return "-" if value is None else Html.num(f"{value:+.4f}")


def _or_dash(value) -> object:
    return "-" if value is None else value
