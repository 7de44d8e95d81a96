"""The studies' results as console tables (the HTML report's section is `moon.report.study`)."""

from __future__ import annotations

import numpy as np

from moon import ui


def print_exchange_rate(results: dict) -> None:
    metrics = list(results["rates"])
    rows = [(row["label"], row["version"], *(row["metrics"][m] for m in metrics), float(np.mean(row["delta_auc"])),
             float(np.std(row["delta_auc"], ddof=1)) if len(row["delta_auc"]) > 1 else float("nan"))
            for row in results["versions"]]
    ui.print_table("representation versions: intermediate metrics and CUBE's ΔAUC over DIN (mean of seeds)", rows,
                   ("representation", "version", *metrics, "ΔAUC", "seed std"))
    rows = [(metric, rate["rate"], f"[{rate['ci'][0]:+.4f}, {rate['ci'][1]:+.4f}]", rate["spearman"],
             rate["loo_error"], rate["spread"]) for metric, rate in results["rates"].items()]
    ui.print_table(f"exchange rate: ΔAUC per +{results['per']} of the metric ({len(results['versions'])} versions)",
                   rows, ("metric", "rate", "95% CI", "Spearman ρ", "LOO error", "ΔAUC spread"))
    ui.log(results["verdict"]["text"])


def print_scaling(results: dict) -> None:
    rows = []
    for axis, curves in (("tokens", ("recall", "ctr")), ("negatives", ("recall",))):
        for curve in curves:
            rows.append(fit_row(f"{axis}: {results[axis][curve]['quantity']}", results[axis][curve]))
    for model, fits in results["behaviour_length"]["fits"].items():
        for fit in fits.values():
            rows.append(fit_row(f"length ({model}): {fit['quantity']}", fit))
    ui.print_table("scaling curves (flat, log-linear or y = a·x^(-b) + c, whichever predicts left-out x best), "
                   "the largest x held out and predicted", rows, FIT_COLUMNS)
    for axis in ("tokens", "negatives"):
        points = results[axis]["points"]
        ui.print_table(f"{axis}: {results[axis]['x']}", [(p["name"], p["x"], p["recall"]) for p in points],
                       ("run", "x", "image R@10"))
    ui.log(results["verdict"])


FIT_COLUMNS = ("curve", "form", "trend", "b", "c", "R²", "held-out x", "predicted", "observed", "within seed CI",
               "reaches its reference at")


def fit_row(name: str, fit: dict) -> tuple:
    """A fitted curve as a table row: its form and trend, exponent and floor where it is a power
    law, R², the held-out check, where it meets its reference."""
    if "error" in fit:
        return (name, fit["error"], *("-" for _ in FIT_COLUMNS[2:]))
    curve, held = fit["curve"], fit["held_out"]
    exponent = curve["params"]["b"] if curve["form"] == "power law" else "-"
    floor = curve["params"]["c"] if curve["form"] != "log-linear" else "-"
    if "fit_without" not in held:  # no held-out check: too few points
        held_cells = ("-", "-", "-", "-")
    else:
        within = "-" if held["within_seed_ci"] is None else ("yes" if held["within_seed_ci"] else "no")
        held_cells = (held["x"], held["predicted"], held["observed"], within)
    ref = fit.get("reference")
    reached = "-" if not ref else ("already past" if ref["already"] else
                                   f"never ({curve['trend']})" if ref["reached_at"] is None else
                                   f"{ref['reached_at']:,.0f}")
    return (name, curve["form"], curve["trend"], exponent, floor, curve["r2"], *held_cells, reached)
