"""The non-learned baseline embedder: LSA text vectors beside a colour/texture image descriptor.

Every learned MOON model is measured against this embedder, and the pairs stage uses it
to mine hard negatives and to pick each item's hardest query. It puts every query and
every item view into one space of `dim = text_dims + IMAGE_DIMS` dimensions, so any
query is compared with any item by a dot product. All vectors are float32 with unit L2
norm, except that an input with nothing to describe (an empty text, or a text with no
word or character n-gram seen in fitting) is the zero vector, similar to nothing.

The text part is `moon.baseline.text`, the image part `moon.baseline.descriptor`.

**Views.** `item_text` gives the text an item shows in a view: for "richer-text" its
title, category path (root to leaf) and attribute values; for "title+image" its title;
for "image" nothing. A text-only view is the text part alone, the "image" view the image
part alone. A text+image view (or query) concatenates the text part times
sqrt(TEXT_SHARE) and the image part times sqrt(1 - TEXT_SHARE), each unit-norm, and
re-normalises (a no-op unless a part is zero): between two text+image vectors the dot
product is TEXT_SHARE x text cosine + (1 - TEXT_SHARE) x image cosine. A text query and
an image-only item (or the reverse) share no dimensions and have similarity 0: the
baseline cannot search across modalities.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
from sklearn.decomposition import TruncatedSVD
from sklearn.pipeline import FeatureUnion

from moon import ui
from moon.baseline.descriptor import IMAGE_DIMS, image_descriptors
from moon.baseline.text import MAX_FIT_TEXTS, TEXT_SHARE, normalise_text
from moon.baseline.text import tfidf as text_tfidf
from moon.io.atomic import atomic_file, atomic_json
from moon.vectors import unit_rows
from moon.views import check_view, item_text

BATCH = 4096  # texts per TF-IDF batch
STATE_FILE = "baseline.pkl"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
TEXT_DIMS = 128  # the text part's LSA dims unless `fit` is told otherwise: dim = TEXT_DIMS + IMAGE_DIMS


class BaselineEmbedder:
    """LSA text vectors and a colour/texture image descriptor in one normalised space."""

    name = "baseline"

    def __init__(self, tfidf: FeatureUnion, projection: np.ndarray, seed: int, fit_texts: int):
        self.tfidf = tfidf
        self.projection = projection  # (n-grams, text_dims) float32; zero columns pad a small corpus
        self.seed = seed
        self.fit_texts = fit_texts

    @property
    def text_dims(self) -> int:
        return self.projection.shape[1]

    @property
    def image_dims(self) -> int:
        return IMAGE_DIMS

    @property
    def dim(self) -> int:
        return self.text_dims + IMAGE_DIMS

    @classmethod
    def fit(
        cls, items: pa.Table, extra_texts: Iterable[str] = (), text_dims: int = TEXT_DIMS, seed: int = 0
    ) -> BaselineEmbedder:
        """Fits the text part on the items' richer texts and `extra_texts` (e.g. query texts)."""
        if text_dims < 1:
            raise ValueError(f"text_dims must be at least 1, got {text_dims}")
        texts = _item_texts(items, "richer-text") + [text for text in extra_texts if text]
        if len(texts) > MAX_FIT_TEXTS:
            keep = np.sort(np.random.default_rng(seed).choice(len(texts), MAX_FIT_TEXTS, replace=False))
            texts = [texts[i] for i in keep]
        if not any(normalise_text(text).strip() for text in texts):
            raise ValueError("cannot fit the baseline embedder: the items and extra texts hold no words")
        tfidf = text_tfidf()
        counts = tfidf.fit_transform(texts)
        # The SVD cannot have more components than the corpus has texts or n-grams.
        components = max(1, min(text_dims, counts.shape[0], counts.shape[1] - 1))
        svd = TruncatedSVD(components, algorithm="randomized", n_iter=7, random_state=seed).fit(counts)
        projection = np.zeros((counts.shape[1], text_dims), dtype=np.float32)
        projection[:, : len(svd.components_)] = svd.components_.T
        return cls(tfidf, projection, seed, len(texts))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Text queries (or item texts): (n, dim) float32, the image part zero."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        out[:, : self.text_dims] = self._text_part(texts)
        return out

    def encode_images(self, images: list[bytes], advance: ui.Advance | None = None) -> np.ndarray:
        """Image queries (or item images), encoded PNG/JPEG/...: (n, dim) float32, the text part zero."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        out[:, self.text_dims :] = image_descriptors(images, advance)
        return out

    def encode_text_image(self, texts: list[str], images: list[bytes], advance: ui.Advance | None = None) -> np.ndarray:
        """Queries (or items) made of a text and an image: the two parts weighted by TEXT_SHARE."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return combine(self._text_part(texts), image_descriptors(images, advance))

    def encode_items(self, items: pa.Table, view: str, advance: ui.Advance | None = None) -> np.ndarray:
        """Items in one of ITEM_VIEWS: (n, dim) float32. `advance(n)` reports the images described."""
        check_view(view)
        if view == "image":
            return self.encode_images(items.column("image").to_pylist(), advance)
        texts = _item_texts(items, view)
        if view == "richer-text":
            return self.encode_texts(texts)
        return self.encode_text_image(texts, items.column("image").to_pylist(), advance)

    def _text_part(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.text_dims), dtype=np.float32)
        for start in range(0, len(texts), BATCH):
            projected = self.tfidf.transform(texts[start : start + BATCH]) @ self.projection
            out[start : start + BATCH] = unit_rows(np.asarray(projected, dtype=np.float32))
        return out

    def save(self, path: Path) -> Path:
        """Writes the embedder into directory `path`: the fitted state and a readable manifest."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {"version": FORMAT_VERSION, "tfidf": self.tfidf, "projection": self.projection}
        state |= {"seed": self.seed, "fit_texts": self.fit_texts}
        atomic_file(path / STATE_FILE, pickle.dumps(state, protocol=5))
        manifest = {
            "embedder": self.name,
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "text_dims": self.text_dims,
            "image_dims": self.image_dims,
            "text_share": TEXT_SHARE,
            "seed": self.seed,
            "fit_texts": self.fit_texts,
        }
        atomic_json(path / MANIFEST_FILE, manifest)
        return path

    @classmethod
    def load(cls, path: Path) -> BaselineEmbedder:
        """Reads an embedder written by `save` (a pickle: load only directories you trust)."""
        state_file = Path(path) / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"no baseline embedder in {path}: {STATE_FILE} is missing")
        state = pickle.loads(state_file.read_bytes())
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{state_file} has format version {state.get('version')}, expected {FORMAT_VERSION}")
        return cls(state["tfidf"], state["projection"], state["seed"], state["fit_texts"])


def combine(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Text+image vectors from unit-norm text and image parts; a zero part leaves the other alone."""
    joined = np.concatenate([text * np.sqrt(TEXT_SHARE), image * np.sqrt(1 - TEXT_SHARE)], axis=1)
    return unit_rows(joined.astype(np.float32, copy=False))


def _item_texts(items: pa.Table, view: str) -> list[str]:
    if view == "image":
        return [""] * items.num_rows
    titles = items.column("title").to_pylist()
    if view == "title+image":
        return [title or "" for title in titles]
    categories = items.column("category").to_pylist()
    attributes = items.column("attributes").to_pylist()
    return [item_text(t, c, a, view) for t, c, a in zip(titles, categories, attributes, strict=True)]
