"""A gazetteer named-entity recogniser for product titles and search queries.

The dictionary comes from the catalogue itself: brands, colours, materials and other
attribute values, every level of the category paths, plus gender and material words, and
the lexicon the catalogue's source recorded in the items manifest (`lexicon`: entity type
-> phrases; the simulator records its colour and product-noun synonyms there, a real
catalogue records none). An Aho-Corasick automaton (pyahocorasick) finds
every dictionary phrase in a text at once; overlapping hits are resolved leftmost-longest.

Texts and phrases are normalised the same way: lower case, every run of characters other
than letters and digits becomes a word break ("T-Shirt" ~ "t shirt"). Words are then
joined by two spaces and a phrase is stored with one space on either side, so a phrase
can only match whole words ("men" never inside "women") and two adjacent phrases share
no character (" red " and " dress " both match in "  red  dress  ").
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Entity types, highest priority first: a phrase listed under several types takes the first.
KINDS = ("gender", "colour", "material", "category", "brand", "attribute")

GENDER_WORDS = (
    "men", "mens", "men's", "man", "women", "womens", "women's", "woman", "ladies", "lady",
    "boys", "boy", "boy's", "girls", "girl", "girl's", "unisex", "kids", "kid", "kid's",
    "children", "child", "baby", "babies", "infant", "infants", "toddler", "toddlers",
    "gents", "male", "female",
)  # fmt: skip

MATERIAL_WORDS = (
    "cotton", "organic cotton", "linen", "polyester", "wool", "woollen", "woolen", "merino",
    "cashmere", "silk", "denim", "leather", "genuine leather", "faux leather", "pu leather",
    "suede", "canvas", "mesh", "rubber", "nylon", "viscose", "rayon", "spandex", "lycra",
    "elastane", "satin", "velvet", "chiffon", "georgette", "crepe", "fleece", "acrylic",
    "corduroy", "tweed", "khadi", "modal", "jute", "bamboo", "straw", "fabric", "synthetic",
    "plastic", "metal", "stainless steel", "sterling silver", "brass", "titanium", "alloy",
    "ceramic", "porcelain", "glass", "wood", "wooden", "microfiber", "microfibre",
)  # fmt: skip

# Attribute names whose values are entities of a named type; other values are "attribute".
ATTRIBUTE_KINDS = {
    "brand": "brand",
    "colour": "colour", "color": "colour", "base_colour": "colour", "basecolour": "colour",
    "material": "material", "fabric": "material",
    "gender": "gender",
}  # fmt: skip

MIN_ATTRIBUTE_CHARS = 3
BRAND_MIN_ITEMS = 3  # a learned brand must lead the titles of at least this many items
BRAND_MAX_WORDS = 4
COUNT_CHUNK = 100_000  # texts normalised and scanned as one string by count()

_WORD = re.compile(r"[^\W_]+")
_BREAK = re.compile(r"(?:[^\w\n]|_)+")  # runs of anything but letters/digits; keeps the text separator
_SPACES = re.compile(r" +")
_KIND_BITS = 3  # automaton value: phrase length in characters << _KIND_BITS | kind index


def words(text: str) -> list[str]:
    """The normalised words of a text: lower case, split at everything but letters and digits."""
    return [word.lower() for word in _WORD.findall(text)]


def _key(phrase_words: Iterable[str]) -> str:
    return " " + "  ".join(phrase_words) + " "


class Gazetteer:
    """Finds brand, colour, material, category, attribute and gender mentions in short texts."""

    def __init__(self, phrases: Mapping[str, Iterable[str]]):
        """`phrases`: entity type (one of KINDS) -> surface phrases of that type."""
        self.kinds: dict[tuple[str, ...], str] = {}
        for kind in KINDS:  # priority order: the first type to claim a phrase keeps it
            for phrase in phrases.get(kind, ()):
                for variant in _variants(phrase, inflect=kind == "category"):
                    self.kinds.setdefault(variant, kind)
        self._automaton = ahocorasick.Automaton()
        for phrase_words, kind in self.kinds.items():
            key = _key(phrase_words)
            self._automaton.add_word(key, len(key) << _KIND_BITS | KINDS.index(kind))
        if self.kinds:
            self._automaton.make_automaton()

    @classmethod
    def from_items(cls, items: pa.Table, lexicon: Mapping[str, Iterable[str]] | None = None) -> Gazetteer:
        """Builds the dictionary from a catalogue in the ITEMS schema and its source's `lexicon`.

        Without a "brand" attribute, brands are learned from the titles: the words that
        lead a title before its first gender word or first other entity ("Puma" in
        "Puma Men Blue Sports Shoes"), kept when they lead the titles of several items.
        """
        phrases = _catalogue_phrases(items)
        for kind, words in (lexicon or {}).items():
            if kind not in KINDS:
                raise ValueError(f"lexicon entity type {kind!r} is not one of {', '.join(KINDS)}")
            phrases[kind].update(words)
        if not phrases["brand"]:
            phrases["brand"] = learn_brands(cls(phrases), items["title"].to_pylist())
        return cls(phrases)

    def entities(self, text: str) -> list[tuple[str, str]]:
        """(entity type, surface form as written) of each entity, in text order."""
        if not text or not self.kinds:
            return []
        spans = [m.span() for m in _WORD.finditer(text)]
        found = self.spans([text[a:b].lower() for a, b in spans])
        return [(kind, text[spans[first][0] : spans[last][1]]) for kind, first, last in found]

    def count(self, texts: Iterable[str | None]) -> np.ndarray:
        """Number of entities in each text (None counts 0), as int32."""
        texts = iter(texts)
        counts = []
        while chunk := list(itertools.islice(texts, COUNT_CHUNK)):
            counts.append(self._count_chunk(chunk))
        return np.concatenate(counts) if counts else np.zeros(0, np.int32)

    def spans(self, text_words: list[str]) -> list[tuple[str, int, int]]:
        """(type, first word, last word) of each entity in a text given as normalised words."""
        if not text_words:
            return []
        text = "  " + "  ".join(text_words) + "  "
        word_starts = np.cumsum([2] + [len(w) + 2 for w in text_words[:-1]])
        starts, ends, kinds = _hits(self._automaton, text)
        spans = []
        for i in _leftmost_longest(starts, ends):
            first = int(np.searchsorted(word_starts, starts[i] + 1))
            last = int(np.searchsorted(word_starts, ends[i], side="right")) - 1
            spans.append((KINDS[kinds[i]], first, last))
        return spans

    def _count_chunk(self, texts: list[str | None]) -> np.ndarray:
        if not self.kinds:
            return np.zeros(len(texts), np.int32)
        # One normalised string for the whole chunk, texts separated by "\n": a single
        # automaton scan and a few vectorised steps instead of per-text Python work.
        joined = "\n".join(t or "" for t in texts)
        if joined.count("\n") != len(texts) - 1:  # a text holds a newline of its own
            joined = "\n".join((t or "").replace("\n", " ") for t in texts)
        text = _BREAK.sub(" ", joined.lower())
        text = _SPACES.sub("  ", " " + text.replace("\n", " \n ") + " ")
        text_starts = np.cumsum([0] + [len(part) + 1 for part in text.split("\n")[:-1]])
        starts, ends, _ = _hits(self._automaton, text)
        kept = _leftmost_longest(starts, ends)
        owner = np.searchsorted(text_starts, starts[kept], side="right") - 1
        return np.bincount(owner, minlength=len(texts)).astype(np.int32)


def _hits(automaton: ahocorasick.Automaton, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, end (inclusive) and type index of every phrase occurrence, overlaps included."""
    flat = np.fromiter(itertools.chain.from_iterable(automaton.iter(text)), np.int64)
    ends, values = flat[0::2], flat[1::2]
    return ends - (values >> _KIND_BITS) + 1, ends, values & ((1 << _KIND_BITS) - 1)


def _leftmost_longest(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Indices of the hits kept when, from left to right, the longest hit at each point wins.

    Most hits overlap nothing and are kept as they are; only runs of overlapping hits
    ("navy blue" and "blue") are resolved one by one.
    """
    order = np.lexsort((-ends, starts))
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    overlaps = np.zeros(len(order), bool)
    overlaps[1:] = starts[1:] <= reach[:-1]  # hit k overlaps some hit that starts before it
    keep = ~overlaps
    cursor = -1
    for k in np.flatnonzero(overlaps | np.roll(overlaps, -1)):  # members of overlapping runs
        if not overlaps[k]:  # a run begins: its first hit is the leftmost-longest
            cursor = ends[k]
        elif starts[k] > cursor:
            keep[k] = True
            cursor = ends[k]
    return np.sort(order[keep])


def _variants(phrase: str, inflect: bool) -> set[tuple[str, ...]]:
    """Normalised word tuples a phrase is matched by: as written, hyphenated parts joined
    ("t-shirt" -> "tshirt"), and for categories the singular and plural of the last word."""
    phrase_words = tuple(words(phrase))
    if not phrase_words:
        return set()
    found = {phrase_words}
    joined = tuple(words(re.sub(r"(?<=\w)-(?=\w)", "", phrase)))
    if joined:
        found.add(joined)
    if inflect:
        found |= {(*base[:-1], form) for base in found for form in _inflections(base[-1])}
    return found


def _inflections(word: str) -> tuple[str, str]:
    singular = _singular(word)
    return singular, _plural(singular)


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us")) and len(word) > 3:
        return word[:-1]
    return word


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word[-1].isdigit():
        return word
    return word + "s"


def _catalogue_phrases(items: pa.Table) -> dict[str, set[str]]:
    """Entity type -> phrases, from the catalogue's category paths and attributes and fixed word lists."""
    phrases: dict[str, set[str]] = defaultdict(set)
    phrases["gender"].update(GENDER_WORDS)
    phrases["material"].update(MATERIAL_WORDS)
    levels = pc.unique(pc.list_flatten(items["category"])).to_pylist()
    phrases["category"].update(level for level in levels if level)
    if "attributes" in items.column_names:
        for name, value in _attribute_pairs(items["attributes"]):
            kind = ATTRIBUTE_KINDS.get(name.lower())
            if kind:
                phrases[kind].add(value)
            elif len(value) >= MIN_ATTRIBUTE_CHARS and not value.isdigit():
                phrases["attribute"].add(value)
    return phrases


def _attribute_pairs(column: pa.ChunkedArray) -> set[tuple[str, str]]:
    """Distinct (name, value) pairs of a map column, read without building a dict per row."""
    pairs: set[tuple[str, str]] = set()
    for chunk in column.chunks:
        keys, values = chunk.keys.to_pylist(), chunk.items.to_pylist()
        pairs.update((k, v) for k, v in zip(keys, values) if k and v)
    return pairs


def learn_brands(gazetteer: Gazetteer, titles: Iterable[str | None]) -> set[str]:
    """Leading title words that recur as a brand; `gazetteer` knows every other entity type.

    A candidate is the run of words before the title's first gender word, and the run
    before its first entity of any type (1 to BRAND_MAX_WORDS words). Candidates that lead
    at least BRAND_MIN_ITEMS titles are kept, unless a shorter kept candidate begins them
    ("Puma Deck" adds nothing when "Puma" is a brand).
    """
    support: Counter[tuple[str, ...]] = Counter()
    for title in titles:
        title_words = words(title or "")
        spans = gazetteer.spans(title_words)
        first_entity = spans[0][1] if spans else None
        first_gender = next((first for kind, first, _ in spans if kind == "gender"), None)
        cuts = {cut for cut in (first_entity, first_gender) if cut and cut <= BRAND_MAX_WORDS}
        support.update(tuple(title_words[:cut]) for cut in cuts)
    frequent = sorted((c for c, n in support.items() if n >= BRAND_MIN_ITEMS and _brand_like(c)), key=len)
    kept: set[tuple[str, ...]] = set()
    for candidate in frequent:
        if not any(candidate[:n] in kept for n in range(1, len(candidate))):
            kept.add(candidate)
    return {" ".join(candidate) for candidate in kept}


def _brand_like(candidate: tuple[str, ...]) -> bool:
    """Bare numbers and lone letters lead too many unrelated titles to be matched as brands."""
    text = "".join(candidate)
    return len(text) > 1 and not text.isdigit()
