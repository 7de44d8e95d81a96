"""The recall section: every figure of `eval/retrieval.json`, whatever metric groups it holds.

The evaluation JSON grows (image search, text queries, item to item, hard sets), so it is
read generically: every `{"value": ..., "ci95": [...]}` leaf is one figure, placed by its
path. The key after `models` names the model, the key after `dims` the Matryoshka dimension,
the last key the metric, and what remains of the path the metric group. Leaves directly
under a model's `dims` belong to the image-search group.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moon.report import plots
from moon.report.html import Html, Section, not_run, note, table, text, value_with_ci
from moon.run import RunDir

DEFAULT_GROUP = "image_search"
GROUP_TITLES = {
    "image_search": "image search: user photo -> the item photographed, whole catalogue",
    "purchase_subset": "image search, purchase subset: the photos whose session bought the item",
    "hard_same_leaf": "image search, hard set: only the target's leaf category as distractors",
    "text_search": "text search: held-out text query -> the items its session engaged with",
    "item_to_item": "item -> item: the items its session engaged with after it (itself left out)",
    "labelled_image_search": "labelled image search: the test photos of a labelled query set -> the items judged hits",
    "labelled_text_search": "labelled text search: the test texts of a labelled query set -> the items judged hits",
}
SHARED_QUERIES = {"hard_same_leaf": DEFAULT_GROUP}  # groups measured on another group's queries
PAIRED = "vs_baseline"  # a model's paired differences from the baseline (not recall figures themselves)
PAIRED_KEYS = (PAIRED, "vs_stage1")  # paired differences (from the baseline; stage 2's from stage 1), not recall
HEADLINE_K = 10
DASH = Html.num("-")  # no figure, in a column of numbers


@dataclass(frozen=True)
class Measure:
    group: str
    model: str
    dim: int | None
    metric: str
    value: float
    ci95: tuple[float, float] | None


def read(data: dict) -> tuple[list[Measure], dict[tuple[str, str], int]]:
    """The figures of a parsed retrieval.json and the query count of each (group, model)."""
    measures, queries = [], {}
    for keys, node in _walk(data, ()):
        placed = _place(keys)
        if placed is None:
            continue
        model, dim, rest = placed
        if rest and isinstance(node.get("value"), (int, float)):
            ci = node.get("ci95")
            ci = (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
            group = "/".join(rest[:-1]) or DEFAULT_GROUP
            measures.append(Measure(group, model, dim, rest[-1], float(node["value"]), ci))
        elif isinstance(node.get("queries"), int) and dim is None:
            queries[("/".join(rest) or DEFAULT_GROUP, model)] = node["queries"]
    return measures, queries


def _walk(node: object, keys: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], dict]]:
    """Every dict in the tree with its path; a metric leaf ({"value": number}) is not descended into."""
    if not isinstance(node, dict):
        return
    yield keys, node
    if isinstance(node.get("value"), (int, float)):
        return
    for key, child in node.items():
        yield from _walk(child, (*keys, str(key)))


def _place(keys: tuple[str, ...]) -> tuple[str, int | None, list[str]] | None:
    """(model, dim, the remaining keys) of a path, or None when it names no model."""
    if "models" not in keys[:-1] or any(key in keys for key in PAIRED_KEYS):
        return None
    at = keys.index("models")
    model, rest = keys[at + 1], [*keys[:at], *keys[at + 2 :]]
    if "dims" in rest[:-1] and rest[rest.index("dims") + 1].isdigit():
        at = rest.index("dims")
        return model, int(rest[at + 1]), rest[:at] + rest[at + 2 :]
    return model, None, rest


def section(run_dir: Path) -> Section:
    path = RunDir(run_dir).retrieval_results
    if not path.exists():
        return Section("recall", "Recall", not_run("no retrieval evaluation", "moon eval retrieval"))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return Section("recall", "Recall", note(f"{path} is not valid JSON ({error}): run `moon eval retrieval` again"))
    measures, queries = read(data)
    if not measures:
        return Section("recall", "Recall", note(f"{path} holds no recall figures: run `moon eval retrieval` again"))
    parts, metrics = [_settings(data), _missing_models(run_dir, measures)], {}
    for group in dict.fromkeys(f.group for f in measures):
        chosen = [f for f in measures if f.group == group]
        body, metrics[group] = group_report(group, chosen, queries)
        parts.append(body)
    parts.append(paired_report(data.get("models", {})))
    models = list(dict.fromkeys(f.model for f in measures))
    settings = {key: data[key] for key in ("item_view", "spu_hit") if key in data}
    return Section("recall", "Recall", "\n".join(p for p in parts if p),
                   {"models": models, "recall": metrics, "recall_settings": settings})


def paired_report(models: dict) -> str:
    """Each model's recall@10 minus the baseline's on the same queries, per query set, with its interval."""
    metric = f"recall@{HEADLINE_K}"
    groups = list(dict.fromkeys(g for report in models.values() for g in report.get(PAIRED, {})))
    rows = []
    for model, report in models.items():
        paired = report.get(PAIRED)
        if paired:
            cells = [paired.get(g, {}).get(metric) for g in groups]
            rows.append((model, *(Html.num(_signed_with_ci(c["delta"], c["ci95"])) if c else DASH for c in cells)))
    if not rows:
        return ""
    return (f"<h3>{metric} minus the baseline's, on the same queries</h3><p>the paired difference at each model's "
            "full dimension [95% bootstrap interval over the queries]: a model beats the baseline on a query set "
            "where the interval lies above zero</p>" + table(("model", *(g.replace("_", " ") for g in groups)), rows))


def _signed_with_ci(value: float, ci) -> str:
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _settings(data: dict) -> str:
    """What the catalogue side and a hit were, as the evaluation recorded them."""
    view = data.get("item_view")
    hit = {True: "any SKU of the target's SPU", False: "the target item itself"}.get(data.get("spu_hit"))
    said = [f"catalogue items in the {view} view" if view else "", f"a hit is {hit}" if hit else ""]
    return f"<p>{text('; '.join(s for s in said if s).capitalize())}.</p>" if any(said) else ""


def _missing_models(run_dir: Path, measures: list[Measure]) -> str:
    """A note for trained models the evaluation has not seen (trained after it ran)."""
    seen = {f.model for f in measures}
    missing = [s for s in RunDir(run_dir).trained_models() if s not in seen]
    return note(f"not evaluated yet: {', '.join(missing)}: run `moon eval retrieval`") if missing else ""


def group_report(group: str, measures: list[Measure], queries: dict) -> tuple[str, dict]:
    """The recall table at each model's full dimension, the recall@K curves and the per-dimension view."""
    models = list(dict.fromkeys(f.model for f in measures))
    metric_names = sorted(dict.fromkeys(f.metric for f in measures), key=_metric_order)
    full = {m: max((f.dim for f in measures if f.model == m and f.dim is not None), default=None) for m in models}
    at_full = {(f.model, f.metric): f for f in measures if f.dim == full[f.model]}
    rows, metrics = [], {}
    for m in models:
        cells = [at_full.get((m, name)) for name in metric_names]
        n = queries.get((group, m), queries.get((SHARED_QUERIES.get(group, group), m)))
        rows.append((m, _or_dash(full[m]), _or_dash(n),
                     *(Html.num(value_with_ci(f.value, f.ci95)) if f else DASH for f in cells)))
        metrics[m] = {"dim": full[m], "queries": n,
                      **{f.metric: {"value": f.value, "ci95": list(f.ci95) if f.ci95 else None} for f in cells if f}}
    parts = [f"<h3>{text(GROUP_TITLES.get(group, group.replace('_', ' ')))}</h3>",
             "<p>value [95% bootstrap interval] at each model's full dimension</p>",
             table(("model", "dim", "queries", *metric_names), rows)]
    parts.append(_curves(group, measures, models, full))
    by_dim, headline = _per_dim(group, measures, models)
    parts.append(by_dim)
    for m, values in headline.items():
        metrics[m][f"recall@{HEADLINE_K}_by_dim"] = values
    return "\n".join(p for p in parts if p), metrics


def _curves(group: str, measures: list[Measure], models: list[str], full: dict) -> str:
    curves = {}
    for m in models:
        points = sorted(((k, f) for f in measures if f.model == m and f.dim == full[m] and (k := _k(f.metric))),
                        key=lambda point: point[0])
        if len(points) > 1:
            curves[m] = ([k for k, _ in points], [f.value for _, f in points],
                         [f.ci95 or (f.value, f.value) for _, f in points])
    return plots.recall_curves(f"{group.replace('_', ' ')}: recall@K", curves) if curves else ""


def _per_dim(group: str, measures: list[Measure], models: list[str]) -> tuple[str, dict]:
    """recall@10 at every Matryoshka dimension: a table and a plot, when some model has several dims."""
    metric = f"recall@{HEADLINE_K}"
    chosen = [f for f in measures if f.metric == metric and f.dim is not None]
    dims = sorted({f.dim for f in chosen})
    if not any(len({f.dim for f in chosen if f.model == m}) > 1 for m in models):
        return "", {}
    cell = {(f.model, f.dim): f for f in chosen}
    rows = [(m, *(Html.num(value_with_ci(c.value, c.ci95)) if (c := cell.get((m, d))) else DASH for d in dims))
            for m in models]
    series = {m: ([d for d in dims if (m, d) in cell], [cell[m, d].value for d in dims if (m, d) in cell])
              for m in models}
    series = {m: s for m, s in series.items() if s[0]}
    body = (f"<p>{metric} per Matryoshka dimension (a prefix of the vector, re-normalised)</p>"
            + table(("model", *map(str, dims)), rows)
            + plots.per_dim(f"{group.replace('_', ' ')}: {metric} per dimension", metric, series))
    return body, {m: {str(d): v for d, v in zip(*s)} for m, s in series.items()}


def _k(metric: str) -> int | None:
    match = re.fullmatch(r"recall@(\d+)", metric)
    return int(match.group(1)) if match else None


def _metric_order(metric: str) -> tuple:
    k = _k(metric)
    return (0, k, "") if k is not None else (1, 0, metric)


def _or_dash(value: object) -> object:
    return DASH if value is None else value
