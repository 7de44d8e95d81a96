"""The baseline's text part: TF-IDF of words and character n-grams, projected by LSA.

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
"""

from __future__ import annotations

import re

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion

MAX_FIT_TEXTS = 200_000  # texts the TF-IDF and SVD are fitted on; plenty to learn a vocabulary
MAX_WORD_FEATURES = 200_000  # most frequent n-grams kept, bounding memory on large corpora
MAX_CHAR_FEATURES = 300_000
TEXT_SHARE = 0.5  # weight of the text cosine in a text+image similarity: text and image count equally


def normalise_text(text: str) -> str:
    """Lower case, punctuation to spaces: "T-Shirts" and "t shirts" give the same n-grams."""
    return _NOT_ALPHANUMERIC.sub(" ", text.lower())


_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")


def tfidf() -> FeatureUnion:
    """Word 1-2-grams and character 3-5-grams within words, sublinear TF-IDF, side by side."""
    common = {"preprocessor": normalise_text, "sublinear_tf": True, "dtype": np.float32}
    words = TfidfVectorizer(
        analyzer="word", ngram_range=(1, 2), token_pattern=r"\b\w+\b", max_features=MAX_WORD_FEATURES, **common
    )
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), max_features=MAX_CHAR_FEATURES, **common)
    return FeatureUnion([("words", words), ("chars", chars)])
