"""Store versions made without a trained model: the yardsticks a trained model's version is read against.

`moon embed --model NAME` makes them beside the trained stages, through the same version plan,
partitions, resume and reuse (`moon.represent.batch`): running the same command twice reuses
the finished version, and `--incremental` adds the items (and queries) a version lacks with
the very encoder that made it. Their plan names the control (`"control": NAME`); they have
only their full dimension (no Matryoshka dims).

- **baseline** (`vN-baseline`): the non-learned `BaselineEmbedder`, fitted on the catalogue
  exactly as `moon eval retrieval` fits it (`BaselineEmbedder.fit(items)`); items in the view
  retrieval scores it in (`moon.views.SERVED_VIEW`), text queries through `encode_texts`,
  photo queries through `encode_images`. The fitted embedder is kept in the version's folder
  (`baseline/`, written before any shard), so a resumed or incremental run encodes with the
  very same fit. A text with no word the fit has seen is the zero vector, as in retrieval.
- **random** (`vN-random`, the placebo): one unit vector per item and per query, drawn from a
  generator seeded by the config seed and the id (`random_vectors`), so an id gets the same
  vector whatever the order, partitioning or number of processes; `RANDOM_DIM` dims.
- **truth** (`vN-truth`, the oracle): only where the run has the simulated world's `item_truth`
  table (read from the run directory; a run without one gets a `UserError`). An item's vector
  is the concatenation of blocks, each scaled by the square root of its weight in
  `TRUTH_WEIGHTS`, then L2-normalised: a one-hot of its leaf category (from the items table),
  its latent visual style divided by sqrt(style dims) (each coordinate lies in [-1, 1], so
  the block's norm is at most 1), and one-hots of its colour, brand, pattern and price band.
  Between two items whose facts are all known the cosine is therefore about the weighted
  share of facts they agree on (plus the style term), which is how the simulator's true
  relevance is built: the leaf first, then the look (style, colour), then brand and the
  rest. The codes (every value of every attribute, sorted) are fixed in the plan when the
  version is made; a value added later, or a fact the table lacks, leaves its block zero; an
  item with no facts at all is the zero vector. Queries come from the world's `query_truth`
  table (what each query was about): a photo query is the vector of the item photographed;
  a text query keeps only the blocks the simulator's relevance reads from a text: the leaf
  of the item the shopper had in mind, and its colour and brand where the text names them
  (the attribute a text may name is not among the blocks). A query the table lacks is the
  zero vector; a world without the table (simulated by an older MOON) gets no queries, and
  the manifest's `queries_absent` says why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from moon import ui
from moon.baseline import BaselineEmbedder
from moon.baseline.descriptor import IMAGE_DIMS
from moon.baseline.embedder import FORMAT_VERSION, STATE_FILE, TEXT_DIMS
from moon.config import MoonConfig
from moon.errors import UserError
from moon.io.tables import has_table, read_table
from moon.queries import PHOTO
from moon.queries import kind as query_kind
from moon.represent.encoders import ITEM_COLUMNS, VersionEncoder
from moon.store.versions import table_digest
from moon.vectors import unit_rows
from moon.views import SERVED_VIEW

CONTROLS = ("baseline", "random", "truth")
RANDOM_DIM = 64
BASELINE_STATE = "baseline"  # the fitted baseline's folder inside its version
# Shares of an item-item cosine (their square roots scale the blocks); see the module docstring.
TRUTH_WEIGHTS = {"leaf": 0.35, "style": 0.25, "colour": 0.15, "brand": 0.15, "pattern": 0.05, "price_band": 0.05}
TRUTH_FACTS = ("colour", "brand", "pattern", "price_band")  # the discrete columns of ITEM_TRUTH one-hot coded


def open_control(name: str, config: MoonConfig, run_dir: Path) -> VersionEncoder:
    """The encoder of a new version of control `name`."""
    if name == "baseline":
        return BaselineEncoder(run_dir)
    if name == "random":
        return RandomEncoder(config.seed)
    if name == "truth":
        return TruthEncoder(run_dir)
    raise ValueError(f"{name!r} is not one of {CONTROLS}")


def reopen_control(plan: dict, run_dir: Path) -> VersionEncoder:
    """The encoder that made a control's version, rebuilt from its plan (to add to it)."""
    name = plan["control"]
    if name == "baseline":
        return BaselineEncoder(run_dir, fit=False)  # `attach` loads the fit the version keeps
    if name == "random":
        return RandomEncoder(plan["seed"], plan["dims"])
    if name == "truth":
        return TruthEncoder(run_dir, codes=plan["codes"], style_dims=plan["style_dims"])
    raise UserError(f"store version {plan['version']} names an unknown control {name!r} (known: {', '.join(CONTROLS)})")


def _digest(definition: dict) -> str:
    """A control's stand-in for a checkpoint digest: the hash of what defines it."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def _control_plan(name: str, dims: int, item_view: str | None, **definition) -> dict:
    return {"model": name, "control": name, "checkpoint_digest": _digest({"control": name, "dims": dims, **definition}),
            "dims": dims, "matryoshka_dims": [], "item_view": item_view, "bidirectional": None, **definition}


class BaselineEncoder(VersionEncoder):
    """The non-learned baseline, fitted on the catalogue when its version is made."""

    label = "baseline"
    item_columns = ITEM_COLUMNS

    def __init__(self, run_dir: Path, fit: bool = True):
        self.run_dir = Path(run_dir)
        self.fit = fit  # False: only the fit a version keeps will do (a new fit would not match its vectors)
        self._fitted: BaselineEmbedder | None = None

    @property
    def dim(self) -> int:
        return TEXT_DIMS + IMAGE_DIMS

    def plan(self) -> dict:
        return _control_plan(self.label, self.dim, SERVED_VIEW, baseline_format=FORMAT_VERSION)

    def attach(self, version: Path) -> None:
        """Loads the fit the version keeps; fits on the catalogue (and keeps it there) if it has none."""
        state = Path(version) / BASELINE_STATE
        if (state / STATE_FILE).is_file():
            self._fitted = BaselineEmbedder.load(state)
            return
        if not self.fit:
            raise UserError(f"store version {Path(version).name} has lost the baseline fit it was made with "
                            f"({state / STATE_FILE}): make a new version with `moon embed --model baseline`")
        with ui.progress("fit the baseline on the catalogue", None, unit="items") as advance:
            items = read_table(self.run_dir, "items", columns=["item_id", "title", "category", "attributes"])
            self._fitted = BaselineEmbedder.fit(items)  # as `moon eval retrieval` fits it
            advance(items.num_rows)
        self._fitted.save(state)

    @property
    def fitted(self) -> BaselineEmbedder:
        if self._fitted is None:
            raise RuntimeError("attach the baseline encoder to its version before encoding")
        return self._fitted

    def encode_items(self, items: pa.Table, advance: ui.Advance) -> np.ndarray:
        return self.fitted.encode_items(items, SERVED_VIEW, advance)

    def encode_texts(self, texts: list[str], advance: ui.Advance) -> np.ndarray:
        vectors = self.fitted.encode_texts(texts)
        advance(len(texts))
        return vectors

    def encode_photos(self, photos: list[bytes], advance: ui.Advance) -> np.ndarray:
        return self.fitted.encode_images(photos, advance)


def random_vectors(ids: list[str], seed: int, dim: int = RANDOM_DIM) -> np.ndarray:
    """A unit vector per id, from a generator seeded by (seed, id) alone: float32 (len(ids), dim)."""
    out = np.empty((len(ids), dim), dtype=np.float32)
    for row, key in enumerate(ids):
        entropy = int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:16], "little")
        out[row] = np.random.default_rng(entropy).standard_normal(dim, dtype=np.float32)
    return unit_rows(out)


class RandomEncoder(VersionEncoder):
    """The placebo: vectors that know nothing but the id."""

    label = "random"

    def __init__(self, seed: int, dim: int = RANDOM_DIM):
        self.seed, self._dim = seed, dim

    @property
    def dim(self) -> int:
        return self._dim

    def plan(self) -> dict:
        return _control_plan(self.label, self.dim, None, seed=self.seed)

    def encode_items(self, items: pa.Table, advance: ui.Advance) -> np.ndarray:
        return self._drawn(items["item_id"].to_pylist(), advance)

    def encode_queries(self, queries: pa.Table, advance: ui.Advance) -> np.ndarray:
        return self._drawn(queries["query_id"].to_pylist(), advance)

    def _drawn(self, ids: list[str], advance: ui.Advance) -> np.ndarray:
        vectors = random_vectors(ids, self.seed, self.dim)
        advance(len(ids))
        return vectors


class TruthEncoder(VersionEncoder):
    """The oracle: what the simulated world knows about each item, as a unit vector."""

    label = "truth"
    item_columns = ("item_id", "category")

    def __init__(self, run_dir: Path, codes: dict[str, list[str]] | None = None, style_dims: int | None = None):
        if not has_table(run_dir, "item_truth"):
            raise UserError(f"--model truth (the oracle) needs the simulated world's item_truth table, which {run_dir} "
                            "lacks: only a simulated world has one (`moon simulate`, or `moon simulate --catalog "
                            "RUN_DIR` over a real catalogue); pick another --model")
        truth = read_table(run_dir, "item_truth", columns=["item_id", "style", *TRUTH_FACTS])
        self.truth_rows = {item_id: row for row, item_id in enumerate(truth["item_id"].to_pylist())}
        styles = truth["style"].to_pylist()
        self.style_dims = style_dims or max((len(style) for style in styles), default=0)
        self.styles = np.zeros((len(styles), self.style_dims), dtype=np.float32)
        for row, style in enumerate(styles):
            self.styles[row, : min(len(style), self.style_dims)] = style[: self.style_dims]
        self.facts = {fact: [_code(value) for value in truth[fact].to_pylist()] for fact in TRUTH_FACTS}
        items = read_table(run_dir, "items", columns=["item_id", "category"])
        self.leaves = dict(zip(items["item_id"].to_pylist(), map(_leaf, items["category"].to_pylist())))
        if codes is None:
            codes = {"leaf": sorted(set(self.leaves.values()) - {None})}
            codes |= {fact: sorted(set(self.facts[fact]) - {None}) for fact in TRUTH_FACTS}
        self.codes = codes
        self.index = {fact: {value: i for i, value in enumerate(values)} for fact, values in codes.items()}
        self.definition = {"item_truth": table_digest(run_dir, "item_truth"), "weights": TRUTH_WEIGHTS}
        self.queries: dict[str, tuple[str, dict[str, bool]]] = {}  # query_id -> (item in mind, facts named)
        self.queries_absent = None
        if has_table(run_dir, "query_truth"):
            self._read_query_truth(Path(run_dir))
        else:
            self.queries_absent = (f"{run_dir} has no query_truth table (its world was simulated by an older MOON): "
                                   "the oracle describes items only; re-simulate to give it queries")

    def _read_query_truth(self, run_dir: Path) -> None:
        for row in read_table(run_dir, "query_truth").to_pylist():
            self.queries[row["query_id"]] = (row["item_id"], {"colour": row["names_colour"], "brand": row["names_brand"]})
        self.definition["query_truth"] = table_digest(run_dir, "query_truth")

    @property
    def dim(self) -> int:
        return self.style_dims + sum(len(values) for values in self.codes.values())

    def plan(self) -> dict:
        plan = _control_plan(self.label, self.dim, None, **self.definition)
        return {**plan, "style_dims": self.style_dims, "codes": self.codes}

    def encode_items(self, items: pa.Table, advance: ui.Advance) -> np.ndarray:
        vectors = self._vectors(items["item_id"].to_pylist(), [_leaf(path) for path in items["category"].to_pylist()])
        advance(len(vectors))
        return vectors

    def encode_queries(self, queries: pa.Table, advance: ui.Advance) -> np.ndarray:
        ids = queries["query_id"].to_pylist()
        truths = [self.queries.get(query, (None, {})) for query in ids]
        in_mind = [item for item, _ in truths]
        # A photo shows every fact of the item in mind; a text says its leaf and the facts it names.
        photo = np.array([query_kind(query) == PHOTO for query in ids], dtype=bool)
        named = {fact: np.array([facts.get(fact, False) for _, facts in truths], dtype=bool) for fact in TRUTH_FACTS}
        keep = {"style": photo} | {fact: photo | named[fact] for fact in TRUTH_FACTS}
        vectors = self._vectors(in_mind, [self.leaves.get(item) for item in in_mind], keep)
        advance(len(vectors))
        return vectors

    def _vectors(self, item_ids: list[str | None], leaves: list[str | None],
                 keep: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Unit vectors from the facts of items; `keep` masks, per row, the blocks beside the leaf
        to fill (all of them when None)."""
        rows = np.array([self.truth_rows.get(item_id, -1) for item_id in item_ids], dtype=np.int64)
        known = rows >= 0
        kept = {block: known & keep[block] if keep else known for block in ("style", *TRUTH_FACTS)}
        style = np.zeros((len(rows), self.style_dims), dtype=np.float32)
        scale = np.sqrt(TRUTH_WEIGHTS["style"] / max(self.style_dims, 1))
        style[kept["style"]] = self.styles[rows[kept["style"]]] * scale
        blocks = [self._one_hot("leaf", leaves), style]
        for fact in TRUTH_FACTS:
            values = [self.facts[fact][row] if ok else None for row, ok in zip(rows, kept[fact])]
            blocks.append(self._one_hot(fact, values))
        return unit_rows(np.concatenate(blocks, axis=1))

    def _one_hot(self, fact: str, values: list[str | None]) -> np.ndarray:
        """sqrt(weight) at each value's code; a row whose value is unknown or uncoded stays zero."""
        out = np.zeros((len(values), len(self.codes[fact])), dtype=np.float32)
        index = self.index[fact]
        for row, value in enumerate(values):
            if (column := index.get(value)) is not None:
                out[row, column] = np.sqrt(TRUTH_WEIGHTS[fact])
        return out


def _code(value) -> str | None:
    """A discrete fact as a code: a string, None where the fact is unknown (null, or a negative band)."""
    if value is None or (isinstance(value, int) and value < 0):
        return None
    return str(value)


def _leaf(path: list[str] | None) -> str | None:
    return path[-1] if path else None
