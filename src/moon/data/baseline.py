"""The non-learned baseline embedder: LSA text vectors beside a colour/texture image descriptor.

Every learned MOON model is measured against this embedder, and the pairs stage uses it
to mine hard negatives and to pick each item's hardest query. It puts every query and
every item view into one space of `dim = text_dims + IMAGE_DIMS` dimensions, so any
query is compared with any item by a dot product. All vectors are float32 with unit L2
norm, except that an input with nothing to describe (an empty text, or a text with no
word or character n-gram seen in fitting) is the zero vector, similar to nothing.

**Text part** (the first `text_dims` dimensions). The text is lower-cased and every
character that is neither a letter nor a digit becomes a space. Two TF-IDF vectorisers
with sublinear term frequency (1 + log tf) and smoothed idf run on it: word unigrams and
bigrams (one-letter words kept, so sizes like "S" count), and character 3- to 5-grams
within word boundaries (scikit-learn's `char_wb`: robust to misspellings and
inflections). Each is L2-normalised; the two are concatenated, projected by a truncated
SVD (latent semantic analysis; randomised, seeded) onto `text_dims` components and
L2-normalised. The vectorisers and the SVD are fitted on the catalogue's richer texts plus
any extra texts given (query texts), at most `MAX_FIT_TEXTS` of them (a seeded sample
beyond that). A corpus too small for `text_dims` components gets fewer, padded with
zero dimensions, so `dim` never depends on the corpus.

**Image part** (the last `IMAGE_DIMS` dimensions): the colour/texture descriptor. The
image's central square is resampled to `FULL` x `FULL` pixels (a JPEG is decoded at 1/2,
1/4 or 1/8 scale with `Image.draft` when that is still large enough). Products are
centred while a shopper's photo has clutter at its borders, so only the central `SIDE` x
`SIDE` pixels (70% of each side) are described. The median colour of the outer
`FRAME`-pixel frame estimates the background; a pixel's weight is a centred Gaussian
(standard deviation `SPREAD` x `SIDE`) times its foreground weight, which rises linearly
from `BACKGROUND_WEIGHT` to 1 as its largest RGB channel difference from the background
grows from `FOREGROUND_FROM` to `FOREGROUND_TO` levels; weights sum to 1 per image. This
keeps the colour of a thin product (a lamp, a necklace) from being drowned by the plain
catalogue background or the scene behind it. Four blocks, each a weighted histogram:

- hue x saturation: `HUE_BINS` circular hue bins by `SAT_BINS` saturation bins (HSV,
  saturation = (max - min) / max), bilinearly interpolated between bin centres, so a small
  change of light moves weight between neighbouring bins instead of jumping;
- value (brightness, the largest RGB channel): `VALUE_BINS` bins, linearly interpolated;
- gradient orientation: `ORIENTATION_BINS` circular bins of unsigned orientation (0-180
  degrees) of the grey-level central-difference gradient, each pixel voting its weight
  times its gradient magnitude, linearly interpolated;
- edge density: the weighted share d of pixels whose gradient magnitude exceeds
  `EDGE_THRESHOLD` grey levels per pixel, as the two-bin histogram (d, 1 - d).

The gradient blocks leave out the outermost described pixels (no full neighbourhood).
Each block is divided by its sum and square-rooted (the Hellinger map: the dot product of
two blocks is their Bhattacharyya coefficient), which gives it unit L2 norm, so the four
count equally; their concatenation is L2-normalised (a factor 1/2 unless an image is so
flat that it has no gradient at all).

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

import io
import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion

from moon import ui
from moon.data.schema import ITEM_VIEWS

# Text part.
MAX_FIT_TEXTS = 200_000  # texts the TF-IDF and SVD are fitted on; plenty to learn a vocabulary
MAX_WORD_FEATURES = 200_000  # most frequent n-grams kept, bounding memory on large corpora
MAX_CHAR_FEATURES = 300_000
TEXT_SHARE = 0.5  # weight of the text cosine in a text+image similarity: text and image count equally

# Image part. The constants were chosen for photo -> item recall on simulated worlds.
FULL = 46  # side of the resampled image
SIDE = 32  # side of the described central region (70% of FULL)
FRAME = 2  # outer pixels whose median colour estimates the background
SPREAD = 0.3  # standard deviation of the centred Gaussian pixel weight, as a share of SIDE
BACKGROUND_WEIGHT = 0.05  # weight of a pixel of the background colour, relative to a foreground one
FOREGROUND_FROM, FOREGROUND_TO = 16.0, 80.0  # colour difference (levels) over which a pixel becomes foreground
HUE_BINS = 12
SAT_BINS = 6
VALUE_BINS = 8
ORIENTATION_BINS = 8
EDGE_THRESHOLD = 12.0  # gradient magnitude (grey levels per pixel) that counts as an edge
BLOCK_DIMS = {
    "hue_saturation": HUE_BINS * SAT_BINS,
    "value": VALUE_BINS,
    "orientation": ORIENTATION_BINS,
    "edge_density": 2,
}
IMAGE_DIMS = sum(BLOCK_DIMS.values())

BATCH = 4096  # inputs per numpy batch
PROGRESS_FROM = 20_000  # inputs from which a progress bar is shown
STATE_FILE = "baseline.pkl"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


def item_text(title: str, category: Sequence[str] | None, attributes, view: str) -> str:
    """The text an item shows in `view` (one of ITEM_VIEWS); "" for the image view.

    `attributes` is a dict, or the (key, value) pairs Arrow gives for a map column. Only
    the values are written: keys ("colour", "brand") are the same for every item.
    """
    _check_view(view)
    if view == "image":
        return ""
    if view == "title+image":
        return title or ""
    pairs = attributes.items() if isinstance(attributes, dict) else (attributes or ())
    parts = [title or "", " ".join(category or ()), " ".join(value for _, value in pairs if value)]
    return " ".join(part for part in parts if part)


def normalise_text(text: str) -> str:
    """Lower case, punctuation to spaces: "T-Shirts" and "t shirts" give the same n-grams."""
    return _NOT_ALPHANUMERIC.sub(" ", text.lower())


_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")


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
        cls, items: pa.Table, extra_texts: Iterable[str] = (), text_dims: int = 128, seed: int = 0
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
        tfidf = _tfidf()
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

    def encode_images(self, images: list[bytes]) -> np.ndarray:
        """Image queries (or item images), encoded PNG/JPEG/...: (n, dim) float32, the text part zero."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        out[:, self.text_dims :] = image_descriptors(images)
        return out

    def encode_text_image(self, texts: list[str], images: list[bytes]) -> np.ndarray:
        """Queries (or items) made of a text and an image: the two parts weighted by TEXT_SHARE."""
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return combine(self._text_part(texts), image_descriptors(images))

    def encode_items(self, items: pa.Table, view: str) -> np.ndarray:
        """Items in one of ITEM_VIEWS: (n, dim) float32."""
        _check_view(view)
        if view == "image":
            return self.encode_images(items.column("image").to_pylist())
        texts = _item_texts(items, view)
        if view == "richer-text":
            return self.encode_texts(texts)
        return self.encode_text_image(texts, items.column("image").to_pylist())

    def _text_part(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.text_dims), dtype=np.float32)
        for start, stop, advance in _batches(len(texts), "embed texts", "texts"):
            projected = self.tfidf.transform(texts[start:stop]) @ self.projection
            out[start:stop] = l2_normalise(np.asarray(projected, dtype=np.float32))
            advance(stop - start)
        return out

    def save(self, path: Path) -> Path:
        """Writes the embedder into directory `path`: the fitted state and a readable manifest."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {"version": FORMAT_VERSION, "tfidf": self.tfidf, "projection": self.projection}
        state |= {"seed": self.seed, "fit_texts": self.fit_texts}
        _write_atomic(path / STATE_FILE, pickle.dumps(state, protocol=5))
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
        _write_atomic(path / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
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
    return l2_normalise(joined.astype(np.float32, copy=False))


def _check_view(view: str) -> None:
    if view not in ITEM_VIEWS:
        raise ValueError(f"unknown item view {view!r}; expected one of {', '.join(ITEM_VIEWS)}")


def _tfidf() -> FeatureUnion:
    common = {"preprocessor": normalise_text, "sublinear_tf": True, "dtype": np.float32}
    words = TfidfVectorizer(
        analyzer="word", ngram_range=(1, 2), token_pattern=r"\b\w+\b", max_features=MAX_WORD_FEATURES, **common
    )
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), max_features=MAX_CHAR_FEATURES, **common)
    return FeatureUnion([("words", words), ("chars", chars)])


def _item_texts(items: pa.Table, view: str) -> list[str]:
    if view == "image":
        return [""] * items.num_rows
    titles = items.column("title").to_pylist()
    if view == "title+image":
        return [title or "" for title in titles]
    categories = items.column("category").to_pylist()
    attributes = items.column("attributes").to_pylist()
    return [item_text(t, c, a, view) for t, c, a in zip(titles, categories, attributes, strict=True)]


# ---- image descriptor -----------------------------------------------------------------


def image_descriptors(images: Sequence[bytes]) -> np.ndarray:
    """The colour/texture descriptor of each encoded image: (n, IMAGE_DIMS) float32, unit norm."""
    out = np.empty((len(images), IMAGE_DIMS), dtype=np.float32)
    for start, stop, advance in _batches(len(images), "describe images", "images"):
        pixels = np.empty((stop - start, FULL, FULL, 3), dtype=np.uint8)
        for row in range(stop - start):
            pixels[row] = _decode_small(images[start + row], start + row)
        out[start:stop] = _describe(pixels)
        advance(stop - start)
    return out


def _decode_small(data: bytes, index: int) -> np.ndarray:
    """The image's central square as FULL x FULL RGB pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (FULL, FULL))  # JPEG only: decode at a reduced scale, much faster
            image = _to_rgb(image)
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            small = image.resize((FULL, FULL), Image.BILINEAR, box=(left, top, left + side, top + side))
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"image {index} cannot be decoded: {exc}") from exc
    return np.asarray(small)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent parts shown on white as a shop page shows them."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _centre_weights() -> np.ndarray:
    axis = (np.arange(SIDE, dtype=np.float32) + 0.5) / SIDE - 0.5
    squared = axis[:, None] ** 2 + axis[None, :] ** 2
    return np.exp(-squared / (2 * SPREAD**2)).astype(np.float32)


_CENTRE_WEIGHTS = _centre_weights()
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's "L"


def _describe(pixels: np.ndarray) -> np.ndarray:
    """Descriptors of a batch of (n, FULL, FULL, 3) uint8 RGB images."""
    n = len(pixels)
    margin = (FULL - SIDE) // 2
    rgb = pixels[:, margin : margin + SIDE, margin : margin + SIDE].astype(np.float32)
    weights = _pixel_weights(pixels, rgb)
    hue, saturation, value = _hsv(rgb)

    grey = rgb @ _GREY
    dx = (grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]) * 0.5
    dy = (grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]) * 0.5
    magnitude = np.sqrt(dx * dx + dy * dy).reshape(n, -1)
    orientation = np.arctan2(dy, dx).reshape(n, -1) % np.pi
    inner = weights[:, 1:-1, 1:-1].reshape(n, -1)
    edge = np.sum(inner * (magnitude > EDGE_THRESHOLD), axis=1) / np.maximum(inner.sum(axis=1), 1e-12)

    weights = weights.reshape(n, -1)
    blocks = [
        _joint_histogram(
            hue.reshape(n, -1) * HUE_BINS, HUE_BINS, saturation.reshape(n, -1) * SAT_BINS, SAT_BINS, weights
        ),
        _histogram(value.reshape(n, -1) * (VALUE_BINS / 256), VALUE_BINS, weights, circular=False),
        _histogram(orientation * (ORIENTATION_BINS / np.pi), ORIENTATION_BINS, inner * magnitude, circular=True),
        np.stack([edge, 1 - edge], axis=1),
    ]
    return l2_normalise(np.concatenate([_hellinger(block) for block in blocks], axis=1).astype(np.float32))


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """(n, 3) float RGB of a batch of (n, H, W, 3) images' backgrounds: their outer frame's median."""
    n = len(pixels)
    frame = np.concatenate(
        [
            pixels[:, :FRAME].reshape(n, -1, 3),
            pixels[:, -FRAME:].reshape(n, -1, 3),
            pixels[:, FRAME:-FRAME, :FRAME].reshape(n, -1, 3),
            pixels[:, FRAME:-FRAME, -FRAME:].reshape(n, -1, 3),
        ],
        axis=1,
    )
    return np.median(frame, axis=1).astype(np.float32)


def _pixel_weights(pixels: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(n, SIDE, SIDE) weights summing to 1 per image: centred, and low on the background colour."""
    difference = np.abs(rgb - background_colour(pixels)[:, None, None, :]).max(axis=-1)
    foreground = np.clip((difference - FOREGROUND_FROM) / (FOREGROUND_TO - FOREGROUND_FROM), 0, 1)
    weights = _CENTRE_WEIGHTS * (BACKGROUND_WEIGHT + (1 - BACKGROUND_WEIGHT) * foreground)
    return weights / weights.sum(axis=(1, 2), keepdims=True)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in [0, 1), saturation in [0, 1] and value in [0, 255] of float RGB pixels (as colorsys)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = chroma / np.maximum(value, 1e-6)
    safe = np.maximum(chroma, 1e-6)
    sector = np.where(value == r, (g - b) / safe, np.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = np.where(chroma > 0, (sector / 6) % 1.0, 0.0)
    return hue, saturation, value


def _interpolated(x: np.ndarray, bins: int, circular: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values in bin units [0, bins) split between the two nearest bin centres: (low, high, high's share)."""
    position = x - 0.5
    low = np.floor(position)
    share = (position - low).astype(np.float32)
    low = low.astype(np.int64)
    if circular:
        return low % bins, (low + 1) % bins, share
    return np.clip(low, 0, bins - 1), np.clip(low + 1, 0, bins - 1), share


def _histogram(x: np.ndarray, bins: int, weights: np.ndarray, circular: bool) -> np.ndarray:
    """Per-row linearly interpolated histograms of x (n, pixels) in bin units."""
    n = len(x)
    low, high, share = _interpolated(x, bins, circular)
    offset = (np.arange(n) * bins)[:, None]
    votes = np.bincount((low + offset).ravel(), (weights * (1 - share)).ravel(), minlength=n * bins)
    votes += np.bincount((high + offset).ravel(), (weights * share).ravel(), minlength=n * bins)
    return votes.reshape(n, bins)


def _joint_histogram(a: np.ndarray, a_bins: int, b: np.ndarray, b_bins: int, weights: np.ndarray) -> np.ndarray:
    """Per-row bilinearly interpolated 2-D histograms, `a` circular (hue) and `b` linear (saturation)."""
    n = len(a)
    a_low, a_high, a_share = _interpolated(a, a_bins, circular=True)
    b_low, b_high, b_share = _interpolated(b, b_bins, circular=False)
    offset = (np.arange(n) * a_bins * b_bins)[:, None]
    votes = np.zeros(n * a_bins * b_bins)
    for a_bin, a_weight in ((a_low, 1 - a_share), (a_high, a_share)):
        for b_bin, b_weight in ((b_low, 1 - b_share), (b_high, b_share)):
            index = offset + a_bin * b_bins + b_bin
            votes += np.bincount(index.ravel(), (weights * a_weight * b_weight).ravel(), minlength=len(votes))
    return votes.reshape(n, a_bins * b_bins)


def _hellinger(histogram: np.ndarray) -> np.ndarray:
    return np.sqrt(histogram / np.maximum(histogram.sum(axis=1, keepdims=True), 1e-12))


# ---- helpers ----------------------------------------------------------------------------


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _batches(count: int, description: str, unit: str) -> Iterator[tuple[int, int, Callable[[int], None]]]:
    """(start, stop, advance) per batch, with a progress bar when the input is large."""
    if count < PROGRESS_FROM:
        for start in range(0, count, BATCH):
            yield start, min(start + BATCH, count), lambda done: None
        return
    with ui.progress(description, count, unit=unit) as advance:
        for start in range(0, count, BATCH):
            yield start, min(start + BATCH, count), advance


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
