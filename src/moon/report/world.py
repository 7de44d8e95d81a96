"""The report's world section: how hard the run's world is (`eval/world.json`, `moon eval world`),
measured with the baseline and the simulator's truth, beside the real references."""

from __future__ import annotations

import json
from pathlib import Path

from moon.report.html import Html, Section, not_run, table, value_with_ci
from moon.run import RunDir

TITLE = "How hard the world is"


def section(run_dir: Path) -> Section:
    path = RunDir(run_dir).world_results
    if not path.is_file():
        return Section("world", TITLE, not_run("no measure of the world", "moon eval world"))
    results = json.loads(path.read_text())
    photos, real = results["photos"], results["real_photos"]
    rows = [(k, Html.num(value_with_ci(photos[k]["value"], photos[k]["ci"])), Html.num(f"{real[k]:.3f}"),
             f"{results['aim'][k][0]:.2f}-{results['aim'][k][1]:.2f}", Html.num(f"{photos[k]['random']:.3f}"))
            for k in ("R@1", "R@10")]
    parts = [f"<p>The baseline's colour/texture descriptor searches each of {photos['photos']:,} held-out shopper "
             f"photos among its item and {photos['items_per_search'] - 1} random items of other products "
             f"({photos['draws']} draws): a measure of the photos that does not depend on the catalogue's size, "
             f"beside {real['photos']:,} real shop photos of {real['products']} products.</p>",
             table(("", "this world [95% CI]", "real shop photos", "aim", "random"), rows)]
    if "ceilings" in results:
        parts.append(ceilings_table(results["ceilings"]))
    return Section("world", TITLE, "\n".join(parts), {"world": results})


def ceilings_table(ceilings: dict) -> str:
    """Test-day AUC of logistic models on the click model's truth: the lines a CTR model reads against."""
    rows = [(name, Html.num(f"{value:.4f}")) for name, value in ceilings["models"].items()]
    return (f"<h3>Click ceilings</h3><p>Test-day AUC ({ceilings['test_rows']:,} impressions, "
            f"{ceilings['test_clicks']:,} clicks) of logistic models fitted on the train days to what the click "
            "model knew: position only, then the item's appeal, the true relevance, the true fit to the shopper; "
            "and of the true click probability, which no model can beat.</p>" + table(("known", "test AUC"), rows))
