"""MOON as a Python library: load a trained model, encode texts, images and catalogue items,
and search a representation store version.

    import moon

    model = moon.load("runs/demo")                          # the run's latest trained model
    vector = model.encode("red summer dress")               # (dim,) float32, unit length
    photos = model.encode(images=["a.jpg", b"...", pil])    # paths, encoded bytes or PIL images: (3, dim)
    items = model.encode(items=["sku00000001"], view="image", dim=64)   # catalogue items, a Matryoshka dim
    hits = model.search(text="red summer dress", k=10)      # [Hit(item_id, score), ...], best first
    model.search(item_id="sku00000001")                     # its neighbours, the item itself left out

Nothing here computes a vector of its own: texts, images and items are encoded by
`moon.represent.encoders.TrainedEncoder`, exactly as `moon embed` encodes a store version's
queries and items; images are read by `moon.io.images.decode`, the one decoder every stage
uses; searches go through the version's saved index (`moon index`), or, where it has none at
the dimension asked for or it lags behind the version, through an exact index built in memory
from the version's stored vectors.

A search compares the query with the vectors of one store version: by default the newest
finished version made by the loaded weights (matched by checkpoint digest), else the newest
finished version. A text or image query is only meaningful against a version made by the same
weights, so searching another model's version warns.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from moon import ui
from moon.errors import UserError
from moon.io.images import decode
from moon.io.schema import ITEM_VIEWS
from moon.io.tables import dataset, read_table
from moon.model.embedder import SETTINGS_FILE, Embedder
from moon.represent.batch import read_rows
from moon.represent.encoders import TrainedEncoder
from moon.run import MODEL_STAGES, RunDir
from moon.store.index import VectorIndex
from moon.store.indexing import is_current, load_index
from moon.store.versions import Store, StoreVersion, checkpoint_digest, table_digest
from moon.vectors import checked_dim, prefix

# What `encode(images=...)` and `search(image=...)` take: a file path, encoded bytes, or a PIL image.
ImageSource = str | os.PathLike | bytes | bytearray | Image.Image

# Inputs read (and images decoded) at a time: memory holds one chunk of pixels, not a whole list.
CHUNK = 1024

TRAIN_COMMAND = {"pretrain": "moon pretrain", "stage1": "moon posttrain --stage 1",
                 "stage2": "moon posttrain --stage 2"}


class Hit(NamedTuple):
    """One search result: a catalogue item and its cosine similarity to the query."""

    item_id: str
    score: float


def load(path: str | os.PathLike, stage: str | None = None, *, run_dir: str | os.PathLike | None = None,
         device: str | torch.device | None = None) -> MoonModel:
    """A trained MOON model, ready to encode and search.

    `path` is a run directory (`runs/<name>`: its latest trained stage, or `stage`, one of
    pretrain, stage1, stage2) or a model directory (a folder with `moon_model.json`, such as
    `runs/<name>/models/stage2` or a published copy of one). `run_dir` is the run whose catalogue
    and store versions the model reads (items to encode, versions to search); a model directory
    inside a run reads that run by default. `device` defaults to CUDA where there is one, else CPU.
    """
    path = Path(path)
    if (path / SETTINGS_FILE).is_file():
        if stage is not None:
            raise UserError(f"{path} is a model directory, which holds one model: leave out stage={stage!r}, "
                            "or load its run directory with that stage")
        return MoonModel(path, Path(run_dir) if run_dir else run_of(path), device)
    if not path.is_dir():
        raise UserError(f"{path} does not exist: pass a run directory (runs/<name>) or a model directory "
                        f"(a folder with {SETTINGS_FILE})")
    return MoonModel(trained_model(RunDir(path), stage), Path(run_dir) if run_dir else path, device)


def trained_model(run: RunDir, stage: str | None) -> Path:
    """The model directory of `stage` in a run (default: its latest trained stage)."""
    if stage is not None and stage not in MODEL_STAGES:
        raise UserError(f"stage={stage!r} is not a model stage: use one of {', '.join(MODEL_STAGES)}")
    trained = run.trained_models()
    if not trained:
        raise UserError(f"{run.root} has no trained model (nothing in {run.root / 'models'}): train one with "
                        "`moon pretrain` and `moon posttrain --stage 1` (or run `moon demo`), or pass a model "
                        f"directory (a folder with {SETTINGS_FILE})")
    stage = stage or trained[-1]
    if stage not in trained:
        raise UserError(f"{run.root} has no {stage} model (trained: {', '.join(trained)}): train it with "
                        f"`{TRAIN_COMMAND[stage]}`, or load one of those")
    return run.model(stage)


def run_of(model_dir: Path) -> Path | None:
    """The run directory a model directory was published in (`runs/<name>/models/<stage>`), else None."""
    model_dir = model_dir.resolve()
    run = RunDir(model_dir.parent.parent)
    return run.root if model_dir.name in MODEL_STAGES and run.model(model_dir.name) == model_dir else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MoonModel:
    """A trained MOON embedder with the run it reads: what `moon.load` returns.

    `dims` are the dimensions `encode` and `search` take: the Matryoshka prefixes the model was
    trained for and its full width. `item_view` is the view its store versions show items in.
    """

    def __init__(self, model_dir: Path, run_dir: Path | None, device: str | torch.device | None = None):
        self.path = Path(model_dir)
        self.run_dir = run_dir
        self.device = torch.device(device) if device else default_device()
        self.embedder = Embedder.load(self.path, self.device)
        self.label = self.path.resolve().name  # what `moon embed` calls a model directory's versions
        self._catalogue: tuple[str, dict[str, int]] | None = None  # (items digest, item id -> row)
        self._versions: dict[tuple, StoreVersion] = {}  # opened once per state: their vectors are read once
        self._indexes: dict[tuple, VectorIndex] = {}

    def __repr__(self) -> str:
        return f"MoonModel({str(self.path)!r}, dim={self.dim}, run_dir={str(self.run_dir) if self.run_dir else None!r})"

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def dims(self) -> list[int]:
        return sorted({*self.embedder.settings.matryoshka_dims, self.dim})

    @property
    def item_view(self) -> str:
        return self.embedder.settings.served_view

    # ------------------------------------------------------------ encoding

    def encode(self, texts: str | Sequence[str] | None = None, *,
               images: ImageSource | Sequence[ImageSource] | None = None,
               items: str | Sequence[str] | None = None, view: str | None = None, dim: int | None = None,
               batch_size: int = 32, show_progress_bar: bool = False) -> np.ndarray:
        """Vectors of texts, images or catalogue items (exactly one of them): float32 rows of unit length.

        `texts` are encoded as text queries, `images` (file paths, encoded bytes or PIL images) as
        photo queries, `items` (ids of the run's catalogue) in `view`, one of ITEM_VIEWS (default:
        the view the model serves, as its store versions show items). `dim` is a Matryoshka
        dimension (the prefix, re-normalised; default: the full vector). One input (a string, an
        image) gives a (dim,) vector, a list gives (n, dim).
        """
        kind, given = one_of(texts=texts, images=images, items=items)
        if view is not None and kind != "items":
            raise UserError(f"view={view!r} applies to items: pass items=[...] with it, or leave view out")
        dim = self.check_dim(dim)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size={batch_size!r} must be a positive integer")
        single = is_single(kind, given)
        sources = [given] if single else list(given)
        encoder = TrainedEncoder(self.path, self.label, self.device, batch_size, item_view=self._view(view),
                                 embedder=self.embedder)
        encode_chunk = self._chunk_encoder(kind, sources, encoder)
        vectors = prefix(in_chunks(len(sources), encode_chunk, kind, self.dim, show_progress_bar), dim)
        return vectors[0] if single else vectors

    def _chunk_encoder(self, kind: str, sources: list, encoder: TrainedEncoder) -> Callable:
        """`encode_chunk(start, stop, advance)`: the vectors of `sources[start:stop]`. Texts and item ids
        are checked up front; images are decoded and catalogue rows read one chunk at a time, so a
        long list's pixels are never all in memory."""
        if kind == "texts":
            texts = strings(sources)
            return lambda start, stop, advance: encoder.encode_texts(texts[start:stop], advance)
        if kind == "images":
            return lambda start, stop, advance: encoder.encode_photos(read_images(sources[start:stop], start), advance)
        rows, catalogue = self._item_rows(strings(sources, "item id")), dataset(self.run_dir, "items")

        def encode_items(start: int, stop: int, advance: ui.Advance) -> np.ndarray:
            return encoder.encode_items(read_rows(catalogue, rows[start:stop], encoder.item_columns), advance)

        return encode_items

    def check_dim(self, dim: int | None) -> int:
        """`dim`, or the full width for None; refuses a dimension the model was not trained for."""
        return checked_dim(dim, self.dims, "this model")

    def _view(self, view: str | None) -> str:
        if view is None:
            return self.item_view
        if view not in ITEM_VIEWS:
            raise UserError(f"view={view!r} is not an item view: use one of {', '.join(ITEM_VIEWS)}")
        return view

    def _item_rows(self, item_ids: list[str]) -> np.ndarray:
        """Rows of the run's items table that hold `item_ids`, in their order."""
        run = self._run("encode catalogue items")
        rows = self._catalogue_rows(run)
        missing = [item_id for item_id in item_ids if item_id not in rows]
        if missing:
            raise UserError(f"{len(missing)} item id(s) are not in the catalogue of {run} (its items table), "
                            f"e.g. {missing[0]!r}: pass ids from its item_id column")
        return np.array([rows[item_id] for item_id in item_ids], dtype=np.int64)

    def _catalogue_rows(self, run: Path) -> dict[str, int]:
        """item id -> row of the items table, read once per state of the table (a refreshed
        catalogue has a new digest, so rows are never taken from an older one)."""
        digest = table_digest(run, "items")
        if self._catalogue is None or self._catalogue[0] != digest:
            ids = read_table(run, "items", columns=["item_id"])["item_id"].to_pylist()
            self._catalogue = (digest, {item_id: row for row, item_id in enumerate(ids)})
        return self._catalogue[1]

    def _run(self, purpose: str) -> Path:
        if self.run_dir is None:
            raise UserError(f"{self.path} was loaded without a run, so there is nothing to {purpose} from: "
                            "load it with moon.load(..., run_dir='runs/<name>')")
        return self.run_dir

    # ------------------------------------------------------------ search

    def search(self, text: str | None = None, *, image: ImageSource | None = None,
               vector: np.ndarray | Sequence[float] | None = None, item_id: str | None = None, k: int = 10,
               dim: int | None = None, version: str | None = None) -> list[Hit]:
        """The k catalogue items nearest to one query (exactly one of text, image, vector, item_id),
        best first, by cosine similarity in a store version (`store_version(version)`).

        A `vector` wider than `dim` is cut to its Matryoshka prefix. An `item_id` is searched by its
        stored vector, and the item itself is left out of its results. `dim` is one of the version's
        dimensions (default: its full width).
        """
        kind, query = one_of(text=text, image=image, vector=vector, item_id=item_id)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"k={k!r} must be a positive integer")
        stored = self._opened(self.store_version(version))
        dim = version_dim(stored, dim)
        if kind == "item_id":
            queries = self._stored_vector(stored, query, dim)
        elif kind == "vector":
            queries = query_vector(query, dim, stored)
        else:
            if not is_single(kind + "s", query):
                one = "a string" if kind == "text" else "a path, bytes or a PIL image"
                raise UserError(f"{kind}= takes one query, {one}: search a list one query at a time")
            self._check_made_by(stored)
            queries = self.encode(**{kind + "s": query}, dim=dim)[None]
        left_out = query if kind == "item_id" else None
        scores, ids = self._index(stored, dim).search(queries, k + (left_out is not None))
        hits = [Hit(str(found), float(score)) for found, score in zip(ids[0], scores[0]) if found and found != left_out]
        return hits[:k]

    def store_version(self, version: str | None = None) -> StoreVersion:
        """The store version `search` reads: `version` by name, else the newest finished version made
        by this model's weights, else the newest finished version."""
        store = Store(self._run("search"))
        if version is not None:
            try:
                return store.open(version)
            except UserError as error:
                raise UserError(f"{error}: pass one of those as version=, or leave version out for the newest "
                                "version this model made") from None
        made = store.made_by(self.path)
        return store.open(made) if made else store.latest()

    def _opened(self, stored: StoreVersion) -> StoreVersion:
        """The version as first opened in this state (made, or last added to), so its vectors are read
        once; an incremental add changes the manifest, and the next search reads the new state."""
        manifest = stored.manifest
        return self._versions.setdefault((stored.name, manifest.get("created_at"), manifest.get("updated_at")),
                                         stored)

    def _index(self, stored: StoreVersion, dim: int) -> VectorIndex:
        """The version's saved index at `dim` when it holds every item of the version, else an exact
        index built in memory from the stored vectors (nothing is written: `moon index` saves one)."""
        key = (stored.name, stored.manifest.get("created_at"), stored.manifest.get("updated_at"), dim)
        if key not in self._indexes:
            saved = None
            if is_current(self.run_dir, stored.name):
                try:
                    saved = load_index(self.run_dir, stored.name, dim)
                except UserError:  # none saved at this dim (`moon index --per-dim` saves one)
                    pass
            self._indexes[key] = saved or VectorIndex.build(stored.vectors(dim), stored.item_ids(), kind="exact")
        return self._indexes[key]

    def _stored_vector(self, stored: StoreVersion, item_id: str, dim: int) -> np.ndarray:
        """The (1, dim) vector the version holds for `item_id`."""
        if not isinstance(item_id, str):
            raise UserError(f"item_id={item_id!r} must be a string id of the catalogue")
        if stored.rows([item_id])[0] < 0:
            held = ("it is in the catalogue but came after the version: run `moon embed --incremental` and "
                    "`moon index`, or search by its vector: model.search(vector=model.encode(items=...))"
                    if self._in_catalogue(item_id) else "check the id against the items table")
            raise UserError(f"item {item_id!r} is not in store version {stored.name} ({len(stored):,} items): {held}")
        return stored.lookup([item_id], dim)

    def _in_catalogue(self, item_id: str) -> bool:
        return RunDir(self.run_dir).has_table("items") and item_id in self._catalogue_rows(self.run_dir)

    def _check_made_by(self, stored: StoreVersion) -> None:
        """A text or image query is encoded by this model: it can only be compared with vectors of a
        version of the same width, and it is only meaningful against a version these weights made."""
        fix = (f"make one with `moon embed --run-dir {self.run_dir} --model {self.path}`, or pass version= "
               "a version this model made")
        if stored.dim != self.dim:
            raise UserError(f"store version {stored.name} holds {stored.dim}-dim vectors of "
                            f"{stored.manifest['model']}, this model makes {self.dim}-dim ones: {fix}")
        if stored.manifest.get("checkpoint_digest") != checkpoint_digest(self.path):
            warnings.warn(f"store version {stored.name} was made by another model ({stored.manifest['model']}): "
                          f"its scores compare two models' vectors; {fix}", UserWarning, stacklevel=3)


# ---------------------------------------------------------------- inputs


def one_of(**given) -> tuple[str, object]:
    """(name, value) of the one argument given; refuses none or several."""
    chosen = [(name, value) for name, value in given.items() if value is not None]
    if len(chosen) != 1:
        names = ", ".join(f"{name}=" for name in given)
        got = ", ".join(f"{name}=" for name, _ in chosen) or "none"
        raise UserError(f"pass exactly one of {names} (got {got})")
    return chosen[0]


def is_single(kind: str, given) -> bool:
    """Whether `given` is one input of `kind` rather than a list of them."""
    if kind == "images":
        return isinstance(given, (str, os.PathLike, bytes, bytearray, Image.Image))
    return isinstance(given, str)


def strings(values: list, what: str = "text") -> list[str]:
    """`values` when every one is a string; else says which is not."""
    for position, value in enumerate(values):
        if not isinstance(value, str):
            raise UserError(f"{what} {position} is a {type(value).__name__}, not a string: pass strings")
    return values


def read_images(sources: list, start: int) -> list[Image.Image]:
    return [read_image(source, position) for position, source in enumerate(sources, start)]


def read_image(source: ImageSource, position: int = 0) -> Image.Image:
    """An image from a file path, encoded bytes or a PIL image, as every stage decodes it (upright
    RGB, transparency on white); says which one cannot be read and what to pass instead."""
    if isinstance(source, (str, os.PathLike)):
        file = Path(source)
        if not file.is_file():
            raise UserError(f"image {position}: {file} is not a file: pass the path of an image file, "
                            "its bytes, or a PIL image")
        source, what = file.read_bytes(), str(file)
    elif isinstance(source, (bytes, bytearray, Image.Image)):
        what = f"{len(source):,} bytes" if isinstance(source, (bytes, bytearray)) else "a PIL image"
    else:
        raise UserError(f"image {position} is a {type(source).__name__}: pass a file path, encoded bytes "
                        "or a PIL image")
    try:
        return decode(source)
    except Exception as error:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise UserError(f"image {position} ({what}) cannot be decoded ({error}): pass an image PIL reads "
                        "(JPEG, PNG, WebP, ...), e.g. re-save it as JPEG") from None


def in_chunks(count: int, encode_chunk: Callable, kind: str, width: int, show_progress_bar: bool) -> np.ndarray:
    """(count, width) vectors, `encode_chunk(start, stop, advance)` CHUNK inputs at a time, under one
    progress bar when asked for."""
    out = np.empty((count, width), dtype=np.float32)
    bar = ui.progress(f"encode {kind}", count, unit=kind) if show_progress_bar else nullcontext(None)
    with bar as advance:
        for start in range(0, count, CHUNK):
            stop = min(start + CHUNK, count)
            out[start:stop] = encode_chunk(start, stop, advance)
    return out


def version_dim(stored: StoreVersion, dim: int | None) -> int:
    """`dim`, or the version's full width for None; refuses a dimension the version does not serve."""
    return checked_dim(dim, {*stored.matryoshka_dims, stored.dim}, f"store version {stored.name}")


def query_vector(vector, dim: int, stored: StoreVersion) -> np.ndarray:
    """One query vector as a (1, dim) row: its Matryoshka prefix (the index re-normalises it)."""
    x = np.asarray(vector, dtype=np.float32)
    if x.ndim != 1:
        raise UserError(f"vector= takes one vector (1-D), got shape {x.shape}: search one query at a time")
    if x.shape[0] < dim:
        raise UserError(f"the vector has {x.shape[0]} dims, but store version {stored.name} is searched at "
                        f"dim={dim}: pass dim={x.shape[0]} if the version serves it, or a vector of at least "
                        f"{dim} dims")
    return x[None, :dim]
