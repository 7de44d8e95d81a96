"""CTR samples loaded for training: ids encoded, behaviour looked up strictly before each sample.

`CtrData.load` reads `ctr_samples`, the two behaviour side tables and the catalogue once and
keeps them as numpy arrays. A sample points into its user's time-ordered behaviour by two
offsets, `[start, end)`: `end` is the first of the user's events at or after the sample's
`ts` (a binary search over (user, time) keys), so the sequence a batch gathers from it is
what the user did strictly before the sample, newest last, cut to the latest `max_len`.

Two kinds of integer ids appear in a batch:
- *rows* index every catalogue item (and every distinct query of the log): 1..N, 0 = none.
  Representation tables are aligned with rows, so a new item has its vector although it was
  never seen in training.
- *codes* index learned ID embeddings: 0 = padding, 1 = out of vocabulary, 2.. = values seen
  at least `min_count` times among the training samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from moon.ctr.features import FeatureSpec
from moon.io.tables import read_table
from moon.queries import PHOTO, TEXT, kind

PAD, OOV = 0, 1
ACTIONS = ("click", "cart", "purchase")  # weakest first: their codes order them by strength
DISTINCT_WINDOW = 4  # a distinct-item sequence of length L is read from the latest 4 L events
QUERY_KINDS = (TEXT, PHOTO)


@dataclass
class Vocab:
    """String values -> codes (0 padding, 1 out of vocabulary, 2.. known)."""

    values: pa.Array

    @classmethod
    def fit(cls, occurrences: pa.Array | pa.ChunkedArray, min_count: int = 1) -> Vocab:
        counts = pc.value_counts(occurrences.drop_null())
        kept = counts.filter(pc.greater_equal(counts.field("counts"), min_count)).field("values")
        return cls(kept.take(pc.sort_indices(kept)))

    @classmethod
    def of(cls, values: tuple[str, ...]) -> Vocab:
        return cls(pa.array(values, pa.string()))

    def __len__(self) -> int:
        """Rows of the embedding table: padding, out of vocabulary, then the known values."""
        return len(self.values) + 2

    def encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        index = pc.index_in(values, value_set=self.values).to_numpy(zero_copy_only=False)
        return np.where(np.isnan(index.astype(np.float64)), OOV, np.nan_to_num(index) + 2).astype(np.int64)


@dataclass
class Sequences:
    """A side table's events sorted by (user, time), with each sample's [start, end) into them."""

    values: dict[str, np.ndarray]  # aligned arrays over the events, e.g. item rows and action codes
    start: np.ndarray  # per sample
    end: np.ndarray  # per sample
    users: np.ndarray  # per event: its user's number
    _repeats: dict = field(default_factory=dict, repr=False)  # (key, strongest) -> what `_repeated` computes

    def gather(self, rows: np.ndarray, length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The latest `length` events before each of the samples `rows`, newest last, left-padded
        with 0: ({name: (len(rows), length)}, valid mask)."""
        index, valid = self._window(rows, length)
        return {name: np.where(valid, values[index], 0) for name, values in self.values.items()}, valid

    def gather_distinct(self, rows: np.ndarray, length: int, key: str, strongest: str) -> tuple[dict[str, np.ndarray],
                                                                                             np.ndarray]:
        """As `gather`, with each `key` value once: at its latest time before the sample, with the
        largest `strongest` code among its events until then (a click, a cart and a purchase of
        one item are one entry, a purchase). The entries come from the latest
        `DISTINCT_WINDOW * length` events."""
        repeats = self._repeated(key, strongest)
        index, valid = self._window(rows, DISTINCT_WINDOW * length)
        latest = valid & (repeats.next_same[index] >= self.end[rows][:, None])  # not repeated before the sample
        newer = np.cumsum(latest[:, ::-1], axis=1)[:, ::-1]  # 1 for the newest kept entry
        sample, position = np.nonzero(latest & (newer <= length))
        slot = length - newer[sample, position]
        chosen = index[sample, position]
        out = {}
        for name, values in {**self.values, strongest: repeats.strongest_so_far}.items():
            out[name] = np.zeros((len(rows), length), values.dtype)
            out[name][sample, slot] = values[chosen]
        mask = np.zeros((len(rows), length), bool)
        mask[sample, slot] = True
        return out, mask

    def lengths(self) -> np.ndarray:
        return self.end - self.start

    def _window(self, rows: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the latest `length` events before each sample (0 where there are fewer) and
        which are valid."""
        end, start = self.end[rows], self.start[rows]
        index = end[:, None] - length + np.arange(length)[None, :]
        valid = index >= start[:, None]
        return np.where(valid, index, 0), valid

    def strongest_before(self, users: np.ndarray, values: np.ndarray, key: str, strongest: str) -> np.ndarray:
        """Per sample (its user's number in `users`): the largest `strongest` code among the
        user's events before it whose `key` equals the sample's value in `values` (e.g. the
        user's strongest past action on the sample's own item), 0 where there is none. Reads the
        whole history, whatever the length."""
        repeats = self._repeated(key, strongest)
        if not len(repeats.order):
            return np.zeros(len(values), self.values[strongest].dtype)
        groups = self._groups(values, key, users)
        run = np.minimum(np.searchsorted(repeats.run_groups, groups), len(repeats.run_groups) - 1)
        found = (repeats.run_groups[run] == groups) & (values <= self.values[key].max())  # else it aliases another user
        # the run's last event before the sample, in the events ordered by (run, time)
        position = np.searchsorted(repeats.by_run, run * len(repeats.order) + self.end, side="left") - 1
        found &= position >= repeats.run_starts[run]
        return np.where(found, repeats.strongest_so_far[repeats.order[np.maximum(position, 0)]], 0)

    def _groups(self, values: np.ndarray, key: str, users: np.ndarray) -> np.ndarray:
        """(user, value) pairs as one integer key."""
        return users.astype(np.int64) * (int(self.values[key].max(initial=0)) + 1) + values

    def _repeated(self, key: str, strongest: str) -> _Repeats:
        """The events' repeats of one `key` per user, computed once (see `_Repeats`): a sample's
        distinct sequence is then a filter, `next_same >= end`, and its own past action one
        binary search."""
        if (key, strongest) not in self._repeats:
            group = self._groups(self.values[key], key, self.users)
            order = np.argsort(group, kind="stable")  # each (user, key) together, in time order
            starts = np.r_[True, group[order][1:] != group[order][:-1]] if len(group) else np.zeros(0, bool)
            next_same = np.full(len(group), len(group), np.int64)
            next_same[order[:-1][~starts[1:]]] = order[1:][~starts[1:]]
            run_of = np.cumsum(starts) - 1
            codes = self.values[strongest].astype(np.int64)
            scale = int(codes.max(initial=0)) + 1
            strongest_so_far = np.empty_like(self.values[strongest])
            strongest_so_far[order] = np.maximum.accumulate(run_of * scale + codes[order]) - run_of * scale
            self._repeats[(key, strongest)] = _Repeats(
                next_same, strongest_so_far, order, run_starts=np.flatnonzero(starts),
                run_groups=group[order][starts], by_run=run_of * len(group) + order)
        return self._repeats[(key, strongest)]


class _Repeats(NamedTuple):
    """Per (user, key value) run of a side table's events, in time order."""

    next_same: np.ndarray  # per event: the index of the user's next event with the same value (n if none)
    strongest_so_far: np.ndarray  # per event: the largest `strongest` code of the user and value until then
    order: np.ndarray  # the events grouped by run, each run in time order
    run_starts: np.ndarray  # per run: its first position in `order`
    run_groups: np.ndarray  # per run: its (user, value) key, ascending
    by_run: np.ndarray  # per position in `order`: run * n + event index, ascending


@dataclass
class CtrData:
    """Every split's samples, the behaviour they can see, and the catalogue's item features."""

    samples: dict[str, np.ndarray]  # per sample: user, item_row, query_row, position, query_kind, label,
    # own_action (the user's strongest past action on the sample's item, over the whole history), ...
    splits: dict[str, np.ndarray]  # split -> sample indices
    items: dict[str, np.ndarray]  # per catalogue row (0 = none): item_id, shop_id, leaf codes; price
    behaviour: Sequences
    queries: Sequences
    vocabs: dict[str, Vocab]
    item_ids: list[str]  # catalogue ids by row - 1
    query_ids: list[str]  # distinct query ids by row - 1
    user_ids: np.ndarray  # str per sample (gAUC groups)
    request_ids: np.ndarray  # str per sample
    catalogue: pa.Table  # the items columns read (item_id, shop_id, category, price, created_at, leaf), by row - 1
    period_start: int  # the first sample's time (ms): items launched later are new

    @classmethod
    def load(cls, run_dir: Path, spec: FeatureSpec) -> CtrData:
        samples = read_table(run_dir, "ctr_samples")
        behaviour = read_table(run_dir, "ctr_behaviour")
        searches = read_table(run_dir, "ctr_queries")
        catalogue = read_table(run_dir, "items", ["item_id", "shop_id", "category", "price", "created_at"])
        item_ids = catalogue["item_id"]
        query_ids = pc.unique(pa.chunked_array(samples["query_id"].chunks + searches["query_id"].chunks))
        train = samples.filter(pc.equal(samples["split"], "train"))

        def min_count(name: str) -> int:
            feature = spec.get(name)
            return feature.min_count if feature else 1

        catalogue = catalogue.append_column("leaf", pa.array([path[-1] if path else None
                                                              for path in catalogue["category"].to_pylist()], pa.string()))
        trained_rows = pc.index_in(train["item_id"], value_set=item_ids)
        vocabs = {
            "user_id": Vocab.fit(train["user_id"], min_count("user_id")),
            "item_id": Vocab.fit(train["item_id"], min_count("item_id")),
            "shop_id": Vocab.fit(catalogue["shop_id"].take(trained_rows.drop_null()), min_count("shop_id")),
            "leaf": Vocab.fit(catalogue["leaf"].take(trained_rows.drop_null()), min_count("leaf")),
            "past_queries": Vocab.fit(train["query_id"], min_count("past_queries")),
            "behaviour_actions": Vocab.of(ACTIONS),
            "query_kind": Vocab.of(QUERY_KINDS),
        }
        items = {
            name: np.concatenate([[PAD], vocabs[name].encode(catalogue[name])]) for name in ("item_id", "shop_id", "leaf")
        }
        price = pc.fill_null(catalogue["price"], 0.0).to_numpy()
        items["price"] = np.concatenate([[0.0], np.log1p(np.maximum(price, 0.0))]).astype(np.float32)
        item_row = _rows(samples["item_id"], item_ids)
        query_row = _rows(samples["query_id"], query_ids)
        kinds = pa.array([kind(q) for q in samples["query_id"].to_pylist()], pa.string())
        encoded = {
            "user": vocabs["user_id"].encode(samples["user_id"]),
            "item_row": item_row,
            "query_row": query_row,
            "query_code": vocabs["past_queries"].encode(samples["query_id"]),
            "query_kind": vocabs["query_kind"].encode(kinds),
            "position": samples["position"].to_numpy().astype(np.float32),
            "label": samples["label"].to_numpy().astype(np.float32),
            "day": samples["day"].to_numpy(),
        }
        split = samples["split"].to_numpy(zero_copy_only=False)
        users = pc.unique(pa.chunked_array(samples["user_id"].chunks + behaviour["user_id"].chunks
                                           + searches["user_id"].chunks))
        times = [t["ts"].cast(pa.int64()).to_numpy() for t in (samples, behaviour, searches)]
        ranks = np.unique(np.concatenate(times))  # dense time ranks: exact keys of any resolution

        def keys(table: pa.Table, ts: np.ndarray) -> np.ndarray:
            user = pc.index_in(table["user_id"], value_set=users).to_numpy().astype(np.int64)
            return (user << 32) | np.searchsorted(ranks, ts)

        sample_keys = keys(samples, times[0])
        sample_users = sample_keys >> 32 << 32
        history = _sequences(keys(behaviour, times[1]), sample_keys, sample_users, {
            "item_row": _rows(behaviour["item_id"], item_ids),
            "action": vocabs["behaviour_actions"].encode(behaviour["action"]),
        })
        encoded["own_action"] = history.strongest_before(sample_keys >> 32, item_row, "item_row", "action")
        return cls(
            samples=encoded,
            splits={name: np.flatnonzero(split == name) for name in ("train", "valid", "test")},
            items=items,
            behaviour=history,
            queries=_sequences(keys(searches, times[2]), sample_keys, sample_users, {
                "query_row": _rows(searches["query_id"], query_ids),
                "query_code": vocabs["past_queries"].encode(searches["query_id"]),
            }),
            vocabs=vocabs,
            item_ids=item_ids.to_pylist(),
            query_ids=query_ids.to_pylist(),
            user_ids=samples["user_id"].to_numpy(zero_copy_only=False),
            request_ids=samples["request_id"].to_numpy(zero_copy_only=False),
            catalogue=catalogue,
            period_start=int(times[0].min()) if len(times[0]) else 0,
        )

    def batches(self, split: str, batch_size: int, max_len: int, query_max_len: int, seed: int | None = None,
                rank: int = 0, world_size: int = 1, distinct_items: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The split's samples in batches of tensors; shuffled by `seed` (None: in order). With
        several processes each takes its slice of every global batch."""
        order = self.splits[split]
        if seed is not None:
            order = order[np.random.default_rng(seed).permutation(len(order))]
        for first in range(0, len(order), batch_size * world_size):
            rows = order[first:first + batch_size * world_size][rank::world_size]
            if len(rows):
                yield self.batch(rows, max_len, query_max_len, distinct_items)

    def batch(self, rows: np.ndarray, max_len: int, query_max_len: int,
              distinct_items: bool = False) -> dict[str, torch.Tensor]:
        """The samples `rows` with their behaviour (each item once when `distinct_items`) and
        past queries, as tensors."""
        batch = {name: values[rows] for name, values in self.samples.items()}
        if distinct_items:
            history, batch["behaviour_mask"] = self.behaviour.gather_distinct(rows, max_len, "item_row", "action")
        else:
            history, batch["behaviour_mask"] = self.behaviour.gather(rows, max_len)
        batch["behaviour_rows"], batch["behaviour_actions"] = history["item_row"], history["action"]
        past, batch["past_query_mask"] = self.queries.gather(rows, query_max_len)
        batch["past_query_rows"], batch["past_query_codes"] = past["query_row"], past["query_code"]
        return {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in batch.items()}

    def vocab_sizes(self) -> dict[str, int]:
        return {name: len(vocab) for name, vocab in self.vocabs.items()}


def _rows(values: pa.ChunkedArray, universe: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """1-based row of each value in `universe`, 0 where it is absent."""
    index = pc.index_in(values, value_set=universe).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(np.isnan(index), 0, np.nan_to_num(index) + 1).astype(np.int64)


def _sequences(event_keys: np.ndarray, sample_keys: np.ndarray, sample_users: np.ndarray,
               values: dict[str, np.ndarray]) -> Sequences:
    order = np.argsort(event_keys, kind="stable")
    event_keys = event_keys[order]
    return Sequences(
        values={name: array[order] for name, array in values.items()},
        start=np.searchsorted(event_keys, sample_users, side="left"),
        end=np.searchsorted(event_keys, sample_keys, side="left"),  # strictly before the sample's time
        users=event_keys >> 32,
    )
