"""Near-duplicate items of the catalogue: the same picture, or the same title, under other ids.

Two relations, each found without comparing all pairs:

- image: 64-bit perceptual hashes (`imagehash.phash`) within `phash_distance` bits.
  The hash is cut into distance+1 bands; two hashes that differ in at most `distance`
  bits agree on at least one whole band (pigeonhole), so only hashes sharing a band
  value are compared.
- title: word sets of the normalised titles, bucketed by MinHash LSH at the Jaccard
  threshold `title_similarity`; candidates are kept when their exact Jaccard similarity
  reaches it.

The connected components of the union of both relations are the groups.
"""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pyarrow as pa
from datasketch import MinHash, MinHashLSH
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from moon import ui
from moon.data import schema
from moon.data.entities import words

HASH_BITS = 64
PHASH_SIDE = 32  # imagehash.phash scales every image to 32x32 grey pixels
NUM_PERM = 128
_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], np.uint8)


def near_duplicate_groups(items: pa.Table, phash_distance: int, title_similarity: float, seed: int = 0) -> pa.Table:
    """Items that share a near-identical image or title with another item (schema NEAR_DUPLICATES).

    Only members of groups of two or more are listed. `group_id` is the group's smallest
    item_id; `by` says which relations linked the item: image, title or image+title.
    """
    hashes, has_hash, title_words = fingerprints(items)
    image_pairs = image_duplicate_pairs(hashes, has_hash, phash_distance)
    title_pairs = title_duplicate_pairs(title_words, title_similarity, seed)
    return group_table(items["item_id"].to_numpy(zero_copy_only=False), image_pairs, title_pairs)


def fingerprints(items: pa.Table) -> tuple[np.ndarray, np.ndarray, list[frozenset[str]]]:
    """Per item: its image's phash as uint64, whether the image could be decoded, its title's word set."""
    hashes = np.zeros(items.num_rows, np.uint64)
    has_hash = np.zeros(items.num_rows, bool)
    row = 0
    with ui.progress("hashing images", items.num_rows) as advance:
        for batch in items.select(["image"]).to_batches(max_chunksize=2048):
            for data in batch.column(0).to_pylist():
                image_hash = phash(data)
                if image_hash is not None:
                    hashes[row], has_hash[row] = image_hash, True
                row += 1
            advance(batch.num_rows)
    title_words = [frozenset(words(title or "")) for title in items["title"].to_pylist()]
    return hashes, has_hash, title_words


def phash(data: bytes | None) -> int | None:
    """The 64-bit perceptual hash of an encoded image, or None when it cannot be decoded."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            # A JPEG decodes straight to grey at the smallest scale that still covers the
            # hash's 32x32 grid: much less work than a full colour decode of a large photo.
            image.draft("L", (PHASH_SIDE, PHASH_SIDE))
            bits = imagehash.phash(image).hash.ravel()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def image_duplicate_pairs(hashes: np.ndarray, has_hash: np.ndarray, distance: int) -> np.ndarray:
    """(k, 2) item index pairs whose hashes differ in at most `distance` bits."""
    rows = np.flatnonzero(has_hash)
    unique, first, codes = np.unique(hashes[rows], return_index=True, return_inverse=True)
    close = np.concatenate([_band_pairs(unique, band, distance) for band in _bands(distance)])
    # Identical hashes are linked directly; the first item of each distinct hash stands for it.
    return np.concatenate([_same_code_pairs(codes, rows), rows[first][np.unique(close, axis=0)]])


def _bands(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of distance+1 bit bands covering the 64-bit hash."""
    count = min(distance + 1, HASH_BITS)
    edges = np.linspace(0, HASH_BITS, count + 1).astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])]


def _band_pairs(unique: np.ndarray, band: tuple[int, int], distance: int) -> np.ndarray:
    """Pairs of distinct hashes that share this band's value and are within `distance` bits."""
    shift, width = band
    keys = (unique >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    found = []
    # Equal keys are contiguous after sorting: pairing each hash with the one `offset`
    # places later covers every pair of a bucket once `offset` reaches the bucket's size.
    for offset in range(1, len(keys)):
        same = keys[:-offset] == keys[offset:]
        if not same.any():
            break
        a, b = order[:-offset][same], order[offset:][same]
        near = _popcount(unique[a] ^ unique[b]) <= distance
        found.append(np.stack([a[near], b[near]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    return _POPCOUNT8[values.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)


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
    _, first = np.unique(codes[rows], return_index=True)  # codes count up, so position = code
    close = _similar_sets(list(distinct), similarity, seed)
    return np.concatenate([_same_code_pairs(codes[rows], rows), rows[first][close]])


def _similar_sets(sets: list[frozenset[str]], similarity: float, seed: int) -> np.ndarray:
    """Index pairs of word sets that MinHash LSH proposes and whose exact Jaccard confirms."""
    lsh = MinHashLSH(threshold=similarity, num_perm=NUM_PERM)
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
    """Connected components of both relations, as rows of NEAR_DUPLICATES for groups of two or more."""
    n = len(item_ids)
    if n == 0:
        return schema.NEAR_DUPLICATES.empty_table()
    edges = np.concatenate([image_pairs, title_pairs])
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    ids = item_ids.astype(str)
    rank = np.empty(n, np.int64)  # position of each item_id in sorted order
    row_of_rank = np.argsort(ids, kind="stable")
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
