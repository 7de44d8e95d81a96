"""The report's study section: the exchange rate (`study/exchange_rate.json`) and the scaling laws
(`study/scaling.json`), each with its plots and a plain-words verdict; absent until a study ran."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moon.report import plots
from moon.report.html import Html, Section, note, table, text
from moon.study.exchange_rate import results_path as exchange_rate_path
from moon.study.fit import curve_from_dict
from moon.study.report import FIT_COLUMNS, fit_row
from moon.study.scaling import results_path as scaling_path

TITLE = "Studies: exchange rate and scaling"


def section(run_dir: Path) -> Section:
    parts, metrics = [], {}
    if exchange_rate_path(run_dir).is_file():
        results = json.loads(exchange_rate_path(run_dir).read_text())
        parts.append(_exchange_rate(results))
        metrics["exchange_rate"] = {"rates": results["rates"], "verdict": results["verdict"]}
    if scaling_path(run_dir).is_file():
        results = json.loads(scaling_path(run_dir).read_text())
        parts.append(_scaling(results))
        metrics["scaling"] = results
    if not parts:
        return Section("study", TITLE, note("no study yet: run `moon study exchange-rate` and `moon study scaling` "
                                            "(configs/study.yaml says how long they take)"))
    return Section("study", TITLE, "\n".join(parts), {"study": metrics} if metrics else {})


def _exchange_rate(results: dict) -> str:
    rows = results["versions"]
    metric_names = list(results["rates"])
    intro = (f"<h3>Exchange rate</h3><p>{len(rows)} representation versions, each scored by its retrieval recall "
             f"and by CUBE's test ΔAUC over DIN (one CTR setup, seeds {text(results['seeds'])}). The rate is the ΔAUC "
             f"bought by +{results['per']} of a metric (Theil-Sen slope, 95% bootstrap interval over versions and "
             "seeds); the leave-one-out error is how far a version's ΔAUC lands from the line fitted to the "
             "others.</p>")
    versions = table(("representation", "version", *metric_names, "ΔAUC", "seed std"),
                     [(row["label"], row["version"], *(row["metrics"][m] for m in metric_names),
                       _signed(float(np.mean(row["delta_auc"]))), _std(row["delta_auc"])) for row in rows])
    rates = table(("metric", "rate per +0.01", "95% CI", "Spearman ρ", "LOO error", "ΔAUC spread"),
                  [(metric, _signed(rate["rate"]), f"[{rate['ci'][0]:+.5f}, {rate['ci'][1]:+.5f}]", rate["spearman"],
                    rate["loo_error"], rate["spread"]) for metric, rate in results["rates"].items()])
    figures = []
    for metric, rate in results["rates"].items():
        points = [(row["label"], row["metrics"][metric], float(np.mean(row["delta_auc"])), _std(row["delta_auc"], 0.0))
                  for row in rows]
        figures.append(plots.exchange_rate(f"ΔAUC vs {metric}", metric, points, rate["rate"], tuple(rate["ci"]),
                                           results["per"]))
    verdict = f"<p><b>Verdict.</b> {text(results['verdict']['text'])}</p>"
    return "\n".join([intro, versions, rates, verdict, *figures])


def _scaling(results: dict) -> str:
    intro = ("<h3>Scaling laws</h3><p>Each curve is the form that best predicts left-out points, of flat, "
             "log-linear and the saturating power law y = a·x<sup>−b</sup> + c, fitted over every seed's point; the "
             "whole choice is then rerun without the largest x, which it predicts.</p>")
    parts = [intro]
    curves = [("tokens", "recall", results["tokens"]), ("tokens", "ctr", results["tokens"]),
              ("negatives", "recall", results["negatives"])]
    rows, figures = [], []
    for axis, key, data in curves:
        fit = data[key]
        if key == "recall":
            points = [(p["x"], 1 - p["recall"]) for p in data["points"]]
        else:
            points = [(p["x"], y) for p in data["points"] for y in p["cube_1_minus_auc"]]
        rows.append(fit_row(f"{axis}: {fit['quantity']}", fit))
        figures.append(_figure(f"{axis}: {fit['quantity']}", data["x"], fit, points))
    length = results["behaviour_length"]
    for model, fits in length["fits"].items():
        for key, fit in fits.items():
            values = "logloss" if key == "logloss" else "auc"
            points = [(p["x"], v if key == "logloss" else 1 - v) for p in length["points"] if p["model"] == model
                      for v in p[values]]
            rows.append(fit_row(f"length ({model}): {fit['quantity']}", fit))
            if key == "logloss":
                figures.append(_figure(f"{model}: {fit['quantity']}", length["x"], fit, points))
    parts.append(table(FIT_COLUMNS, rows))
    parts.append(f"<p><b>Verdict.</b> {text(results['verdict'])}</p>")
    return "\n".join([*parts, *figures])


def _figure(title: str, xlabel: str, fit: dict, points: list[tuple[float, float]]) -> str:
    curve = curve_from_dict(fit["curve"]) if "curve" in fit else None
    label = f"{curve.form}: {curve.describe_briefly()}" if curve else None
    held = fit.get("held_out", {}).get("predicted") if curve else None
    reference = fit.get("reference", {}).get("value")
    return plots.scaling_curve(title, xlabel, fit["quantity"], points, curve, label, held, reference)


def _signed(value: float) -> object:
    return Html.num(f"{value:+.5f}")


def _std(values: list[float], missing: object = "-") -> object:
    return float(np.std(values, ddof=1)) if len(values) > 1 else missing
