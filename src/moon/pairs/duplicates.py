"""Near-duplicate items of the catalogue: the same picture, or the same title, under other ids.

Two relations, each found without comparing all pairs:

- image: 64-bit perceptual hashes (`imagehash.phash`) within `phash_distance` bits. The
  hash is cut into distance+1 bands; two hashes that differ in at most `distance` bits
  agree on at least one whole band (pigeonhole), so only hashes sharing a band value
  are compared. A phash sees only the coarse grey layout of the picture, and catalogue
  photos of one product type are shot alike (a shoe in profile on white), so hash
  neighbours are confirmed on a 16x16 colour thumbnail: the pixels must differ by at
  most MAX_THUMBNAIL_DIFFERENCE of the ink (difference from the background) the two
  pictures hold. Without that check, chains of merely similar photos merge thousands of
  the items of a real fashion catalogue into one group.
- title: word sets of the normalised titles, bucketed by MinHash LSH at the Jaccard
  threshold `title_similarity`; candidates are kept when their exact Jaccard similarity
  reaches it.

The groups are the connected components of the union of both relations.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from datasketch import MinHash, MinHashLSH
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from moon import ui
from moon.io import schema
from moon.io.images import decode
from moon.io.tables import read_batches
from moon.pairs.entities import words

HASH_BITS = 64
PHASH_SIDE = 32  # imagehash.phash scales every image to 32x32 grey pixels
THUMBNAIL_SIDE = 16
MAX_THUMBNAIL_DIFFERENCE = 0.03  # share of the pictures' ink that may differ between duplicates
NUM_PERM = 128
# LSH bands tuned to miss few pairs at the threshold (about 1.6% at exactly the threshold)
# at the price of more candidates: every candidate is checked exactly, so those are cheap.
LSH_WEIGHTS = (0.01, 0.99)  # weights of false positives and false negatives
IMAGE_CHUNK = 2048  # images read and hashed at once
PAIR_BLOCK = 16_384  # candidate pairs whose thumbnails are compared at once
_POPCOUNT8 = np.array([v.bit_count() for v in range(256)], np.uint8)


@dataclass
class Fingerprints:
    """What the duplicate relations compare, one entry per item."""

    phash: np.ndarray  # uint64
    thumbnail: np.ndarray  # uint8 (n, THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)
    decoded: np.ndarray  # bool: the image could be decoded (else phash and thumbnail are zeros)
    title_words: list[frozenset[str]]


def near_duplicate_groups(
    items: pa.Table | ds.FileSystemDataset, phash_distance: int, title_similarity: float, seed: int = 0
) -> pa.Table:
    """Items that share a near-identical image or title with another item (schema NEAR_DUPLICATES).

    `items` is a table, or a dataset whose images are read a chunk at a time. Only members
    of groups of two or more are listed. `group_id` is the group's smallest item_id; `by`
    says which relations linked the item: image, title or image+title.
    """
    prints = fingerprints(items)
    image_pairs = image_duplicate_pairs(prints, phash_distance)
    title_pairs = title_duplicate_pairs(prints.title_words, title_similarity, seed)
    return group_table(_column(items, "item_id").to_numpy(zero_copy_only=False), image_pairs, title_pairs)


def fingerprints(items: pa.Table | ds.FileSystemDataset) -> Fingerprints:
    """Decodes every image once (with a progress bar) for its phash and thumbnail; splits every title."""
    titles = _column(items, "title").to_pylist()
    n = len(titles)
    prints = Fingerprints(
        phash=np.zeros(n, np.uint64),
        thumbnail=np.zeros((n, THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3), np.uint8),
        decoded=np.zeros(n, bool),
        title_words=[frozenset(words(title or "")) for title in titles],
    )
    row = 0
    with ui.progress("hashing images", n) as advance:
        for batch in read_batches(items, ["image"], IMAGE_CHUNK):
            for data in batch.column(0).to_pylist():
                image = _decode(data)
                if image is not None:
                    prints.phash[row] = _phash(image)
                    prints.thumbnail[row] = np.asarray(image.resize((THUMBNAIL_SIDE,) * 2, Image.BILINEAR))
                    prints.decoded[row] = True
                row += 1
            advance(batch.num_rows)
    return prints


def _column(items: pa.Table | ds.FileSystemDataset, name: str) -> pa.ChunkedArray:
    return items[name] if isinstance(items, pa.Table) else items.to_table(columns=[name])[name]


def _decode(data: bytes | None) -> Image.Image | None:
    """The picture as a small RGB image, or None when it cannot be decoded."""
    if not data:
        return None
    try:
        # A JPEG decodes at the smallest scale that still covers the hash's 32x32
        # grid: much less work than a full decode of a large photo.
        return decode(data, draft=(PHASH_SIDE, PHASH_SIDE))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _phash(image: Image.Image) -> int:
    bits = imagehash.phash(image).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def image_duplicate_pairs(prints: Fingerprints, distance: int) -> np.ndarray:
    """(k, 2) item index pairs: phash within `distance` bits and thumbnails alike."""
    rows = np.flatnonzero(prints.decoded)
    # Items with the same hash and thumbnail are linked outright; one of them stands for
    # all in the search, so a picture repeated many times costs one comparison.
    _, first, codes = np.unique(_picture_keys(prints, rows), return_index=True, return_inverse=True)
    leaders = rows[first]
    hashes = prints.phash[leaders]
    near = np.concatenate([_band_pairs(hashes, band, distance) for band in _bands(distance)])
    near_codes = np.unique(near[:, 0] * len(hashes) + near[:, 1])  # a pair found in several bands once
    candidates = np.stack(np.divmod(near_codes, len(hashes)), axis=1)
    alike = _thumbnails_alike(prints.thumbnail, leaders[candidates])
    return np.concatenate([_same_code_pairs(codes, rows), leaders[candidates[alike]]])


def _picture_keys(prints: Fingerprints, rows: np.ndarray) -> np.ndarray:
    """Hash and thumbnail of each row as one opaque value: equal for equal pictures, quick to sort."""
    thumbnails = prints.thumbnail[rows].reshape(len(rows), THUMBNAIL_SIDE * THUMBNAIL_SIDE * 3)
    keys = np.concatenate([prints.phash[rows, None].view(np.uint8), thumbnails], axis=1)
    return keys.view(np.dtype((np.void, keys.shape[1]))).ravel()


def _bands(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of distance+1 bit bands covering the 64-bit hash."""
    count = min(distance + 1, HASH_BITS)
    edges = np.linspace(0, HASH_BITS, count + 1).astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in itertools.pairwise(edges)]


def _band_pairs(hashes: np.ndarray, band: tuple[int, int], distance: int) -> np.ndarray:
    """(k, 2) index pairs (smaller first) of hashes equal in this band and within `distance` bits."""
    shift, width = band
    keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    found = [np.zeros((0, 2), np.int64)]
    # Equal keys are contiguous after sorting: pairing each hash with the one `offset`
    # places later covers every pair of a bucket once `offset` reaches the bucket's size.
    for offset in range(1, len(keys)):
        same = keys[:-offset] == keys[offset:]
        if not same.any():
            break
        a, b = order[:-offset][same], order[offset:][same]
        near = _popcount(hashes[a] ^ hashes[b]) <= distance
        found.append(np.stack([a[near], b[near]], axis=1))
    return np.sort(np.concatenate(found), axis=1)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    return _POPCOUNT8[values.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)


def _thumbnails_alike(thumbnails: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Per pair: do the thumbnails differ by at most MAX_THUMBNAIL_DIFFERENCE of their ink?

    Ink is the distance of each pixel from the picture's background (the median of its
    border), so a small product on a large white background is judged on the product.
    """
    alike = np.zeros(len(pairs), bool)
    for start in range(0, len(pairs), PAIR_BLOCK):
        block = pairs[start : start + PAIR_BLOCK]
        a = thumbnails[block[:, 0]].astype(np.float32)
        b = thumbnails[block[:, 1]].astype(np.float32)
        difference = np.abs(a - b).sum(axis=(1, 2, 3))
        alike[start : start + len(block)] = difference <= MAX_THUMBNAIL_DIFFERENCE * (_ink(a) + _ink(b))
    return alike


def _ink(thumbnails: np.ndarray) -> np.ndarray:
    border = np.concatenate([thumbnails[:, 0], thumbnails[:, -1], thumbnails[:, :, 0], thumbnails[:, :, -1]], axis=1)
    background = np.median(border, axis=1)
    return np.abs(thumbnails - background[:, None, None, :]).sum(axis=(1, 2, 3))


def _same_code_pairs(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Links each row to the first row with the same code: a star per code, enough for grouping."""
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    leaders = rows[first][inverse]
    linked = leaders != rows
    return np.stack([leaders[linked], rows[linked]], axis=1)


def title_duplicate_pairs(title_words: list[frozenset[str]], similarity: float, seed: int) -> np.ndarray:
    """(k, 2) item index pairs whose title word sets have Jaccard similarity >= `similarity`."""
    distinct: dict[frozenset[str], int] = {}
    codes = np.array([distinct.setdefault(ws, len(distinct)) if ws else -1 for ws in title_words], np.int64)
    rows = np.flatnonzero(codes >= 0)
    _, first = np.unique(codes[rows], return_index=True)  # codes count up from 0: position = code
    close = _similar_sets(list(distinct), similarity, seed)
    return np.concatenate([_same_code_pairs(codes[rows], rows), rows[first][close]])


def _similar_sets(sets: list[frozenset[str]], similarity: float, seed: int) -> np.ndarray:
    """Index pairs of word sets that MinHash LSH proposes and whose exact Jaccard confirms."""
    lsh = MinHashLSH(threshold=similarity, num_perm=NUM_PERM, weights=LSH_WEIGHTS)
    signatures = MinHash.bulk(([w.encode() for w in ws] for ws in sets), num_perm=NUM_PERM, seed=seed)
    with lsh.insertion_session() as session:
        for index, signature in enumerate(signatures):
            session.insert(index, signature, check_duplication=False)
    found = []
    for a, signature in enumerate(signatures):
        for b in lsh.query(signature):
            if b > a and len(sets[a] & sets[b]) >= similarity * len(sets[a] | sets[b]):
                found.append((a, b))
    return np.array(found, np.int64).reshape(-1, 2)


def group_table(item_ids: np.ndarray, image_pairs: np.ndarray, title_pairs: np.ndarray) -> pa.Table:
    """Connected components of both relations, as NEAR_DUPLICATES rows for groups of two or more."""
    n = len(item_ids)
    if n == 0:
        return schema.NEAR_DUPLICATES.empty_table()
    edges = np.concatenate([image_pairs, title_pairs])
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    ids = item_ids.astype(str)
    row_of_rank = np.argsort(ids, kind="stable")
    rank = np.empty(n, np.int64)  # position of each item_id in sorted order
    rank[row_of_rank] = np.arange(n)
    leader_rank = np.full(labels.max() + 1, n, np.int64)
    np.minimum.at(leader_rank, labels, rank)  # the smallest item_id of each group
    rows = np.flatnonzero(np.bincount(labels)[labels] >= 2)
    rows = rows[np.lexsort((rank[rows], leader_rank[labels[rows]]))]
    return pa.table(
        {
            "item_id": ids[rows],
            "group_id": ids[row_of_rank[leader_rank[labels[rows]]]],
            "by": _linked_by(n, image_pairs, title_pairs)[rows],
        },
        schema=schema.NEAR_DUPLICATES,
    )


def _linked_by(n: int, image_pairs: np.ndarray, title_pairs: np.ndarray) -> np.ndarray:
    """Per item: image, title or image+title, by the relations it has an edge in."""
    by_image = np.zeros(n, bool)
    by_image[image_pairs.ravel()] = True
    by_title = np.zeros(n, bool)
    by_title[title_pairs.ravel()] = True
    return np.where(by_image & by_title, "image+title", np.where(by_image, "image", "title"))
