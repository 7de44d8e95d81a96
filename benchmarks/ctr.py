"""CTR training speed and memory: CUBE against DIN at behaviour lengths 64 and 1,000, CUBE with
top-K pre-selection, and the time to switch representation versions for a million items.

The samples are synthetic, shaped like the demo's (ID vocabularies, a catalogue with frozen
64-dim float16 representations, users whose time-ordered behaviour is long enough for every
length), so lengths the demo world never reaches can be measured. Each (model, length) pair
trains `--steps` Adam steps through the same code as `moon ctr train` (CtrData.batch -> model ->
BCE), in a child process of its own so its peak RSS (ru_maxrss) is its own. Baseline measured
in the same run: DIN at the same length, reading the whole sequence; the headline is CUBE's
cost over it (time per epoch, `din samples/s / cube samples/s - 1`). Past `--top-k`, CUBE also
runs with `ctr.top_k` (SIM-style hard search: only the K behaviours most similar to the target
reach its attention and pooling), and the headline says how its cost grows with the length.

The version switch writes a store version of `--items` random unit vectors and times
`RepresentationTable.load` for all of them (what `ctr.representations=<version>` does when a
model loads), against reading the same shards with pyarrow alone.

    python benchmarks/ctr.py                       # lengths 64 and 1000, 1M items
    python benchmarks/ctr.py --lengths 64 --items 100000
    python benchmarks/ctr.py --smoke               # seconds: that it runs (the test suite does this)

Prints one JSON object per line; the last line is the headline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

USERS, ITEMS, QUERIES, SAMPLES, DIM = 2_000, 20_000, 20_000, 200_000, 64

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {here!r})
from ctr import train_steps
print(json.dumps(train_steps({model!r}, {length}, {steps}, {batch}, {top_k!r}, {scale!r})))
"""


def synthetic(length: int, top_k: int | None = None, scale: float = 1.0):
    """CtrData, feature spec, config and representation tables of a synthetic world (`scale`
    shrinks its users, items and samples)."""
    import pyarrow as pa
    import torch

    from moon.config import load_config
    from moon.ctr.data import CtrData, Sequences, Vocab
    from moon.ctr.features import load_spec
    from moon.ctr.representations import RepresentationTable
    from moon.vectors import unit_rows

    rng = np.random.default_rng(0)
    users, items_n, queries, samples_n = (max(64, int(n * scale)) for n in (USERS, ITEMS, QUERIES, SAMPLES))
    config = load_config(None, [f"ctr.max_len={length}", f"ctr.query_max_len={min(length, 64)}",
                                *([f"ctr.top_k={top_k}"] if top_k else [])])
    spec = load_spec(config)
    history = length + 50  # every sample sees a full sequence
    events = users * history
    user_of_sample = rng.integers(0, users, samples_n)
    end = user_of_sample * history + history  # each sample sees all of its user's events
    start = user_of_sample * history
    event_users = np.repeat(np.arange(users), history)

    def vocab(n):
        return Vocab(pa.array([str(i) for i in range(n)]))

    samples = {"user": user_of_sample + 2, "item_row": rng.integers(1, items_n + 1, samples_n),
               "query_row": rng.integers(1, queries + 1, samples_n), "query_code": rng.integers(1, queries, samples_n),
               "query_kind": rng.integers(2, 4, samples_n), "position": rng.integers(1, 11, samples_n).astype(np.float32),
               "label": (rng.random(samples_n) < 0.15).astype(np.float32), "day": np.zeros(samples_n, np.int16),
               "own_action": rng.choice([0, 2, 3, 4], samples_n)}
    leaf = rng.integers(0, 60, items_n).astype(str)  # the items as segments read them; training reads none of it
    catalogue = pa.table({"item_id": [str(i) for i in range(items_n)], "shop_id": rng.integers(0, 50, items_n).astype(str),
                          "category": [["root", f"leaf{code}"] for code in leaf], "price": rng.random(items_n),
                          "created_at": pa.nulls(items_n, pa.timestamp("ms", tz="UTC")), "leaf": leaf})
    data = CtrData(
        samples=samples, splits={"train": np.arange(samples_n), "valid": np.arange(0), "test": np.arange(0)},
        items={"item_id": np.r_[0, rng.integers(1, items_n, items_n)], "shop_id": np.r_[0, rng.integers(2, 50, items_n)],
               "leaf": np.r_[0, rng.integers(2, 60, items_n)], "price": rng.random(items_n + 1).astype(np.float32)},
        behaviour=Sequences({"item_row": rng.integers(1, items_n + 1, events), "action": rng.integers(2, 5, events)},
                            start, end, event_users),
        queries=Sequences({"query_row": rng.integers(1, queries + 1, events), "query_code": rng.integers(1, queries, events)},
                          start, end, event_users),
        vocabs={"user_id": vocab(users), "item_id": vocab(items_n), "shop_id": vocab(50), "leaf": vocab(60),
                "past_queries": vocab(queries), "behaviour_actions": vocab(3), "query_kind": vocab(2)},
        item_ids=[str(i) for i in range(items_n)], query_ids=[str(i) for i in range(queries)],
        user_ids=user_of_sample.astype(str), request_ids=np.arange(samples_n).astype(str),
        catalogue=catalogue, period_start=0)

    def table(n: int) -> RepresentationTable:
        vectors = np.r_[np.zeros((1, DIM)), unit_rows(rng.standard_normal((n, DIM)))].astype(np.float16)
        return RepresentationTable("synthetic", DIM, torch.from_numpy(vectors), torch.ones(n + 1, dtype=torch.bool))

    return data, spec, config, {"item_id": table(items_n), "query_id": table(queries)}


def train_steps(model_name: str, length: int, steps: int, batch_size: int, top_k: int | None = None,
                scale: float = 1.0) -> dict:
    """Samples/s of `steps` training steps (after 3 warm-up steps) and this process's peak RSS."""
    import torch

    from moon.ctr.models import MODELS
    from moon.ctr.train import make_optimiser

    torch.manual_seed(0)
    data, spec, config, tables = synthetic(length, top_k, scale)
    model = MODELS[model_name](spec, data, config.ctr, tables)
    optimiser = make_optimiser(model, config)
    batches = data.batches("train", batch_size, length, config.ctr.query_max_len, seed=0,
                           distinct_items=config.ctr.distinct_items)
    timed = 0.0
    for step in range(steps + 3):
        started = time.perf_counter()
        batch = next(batches)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step >= 3:
            timed += time.perf_counter() - started
    return {"model": model_name + (f"-top{top_k}" if top_k else ""), "length": length,
            "samples_per_s": round(steps * batch_size / timed),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def in_child(model: str, length: int, steps: int, batch: int, top_k: int | None = None, scale: float = 1.0) -> dict:
    code = CHILD.format(here=str(Path(__file__).parent), model=model, length=length, steps=steps, batch=batch,
                        top_k=top_k, scale=scale)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def version_switch(items: int) -> dict:
    """Seconds to load a version's table for `items` items, against a bare pyarrow read of its shards."""
    import pyarrow.parquet as pq

    from moon.ctr.representations import RepresentationTable
    from moon.store.versions import Store
    from moon.vectors import unit_rows

    rng = np.random.default_rng(1)
    ids = [f"sku{i:08d}" for i in range(items)]
    with tempfile.TemporaryDirectory() as tmp:
        plan = {"model": "bench", "checkpoint_digest": "0", "dims": DIM, "matryoshka_dims": [32], "dtype": "float16",
                "partitions": 8, "items": items}
        builder = Store(Path(tmp)).begin(plan)
        for p in range(8):
            start, stop = builder.bounds(p)
            builder.write(p, ids[start:stop], unit_rows(rng.standard_normal((stop - start, DIM)).astype(np.float32)))
        version = builder.finish()
        started = time.perf_counter()
        for shard in sorted(version.path.glob("part-*.parquet")):
            pq.read_table(shard)
        bare = time.perf_counter() - started
        started = time.perf_counter()
        table = RepresentationTable.load(Store(Path(tmp)).open(version.name), ids[::-1], "item_id", DIM)
        seconds = time.perf_counter() - started
        assert table.coverage == 1.0
    return {"items": items, "switch_seconds": round(seconds, 2), "bare_read_seconds": round(bare, 2),
            "switch_vs_bare_read": round(seconds / bare, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 1000])
    parser.add_argument("--top-k", type=int, default=50, help="CUBE's ctr.top_k at lengths above it")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="a tiny world, 2 steps: that the benchmark runs")
    args = parser.parse_args()
    scale = 0.02 if args.smoke else 1.0
    if args.smoke:
        args.lengths, args.top_k, args.steps, args.batch, args.items = [8, 32], 4, 2, 64, 2_000
    headline: dict[str, dict] = {"cube_cost_over_din": {}, "cube_memory_vs_din": {}}
    selected = {}
    for length in args.lengths:
        din = in_child("din", length, args.steps, args.batch, scale=scale)
        print(json.dumps({"baseline": "DIN", **din}), flush=True)
        cube = in_child("cube", length, args.steps, args.batch, scale=scale)
        headline["cube_cost_over_din"][str(length)] = round(din["samples_per_s"] / cube["samples_per_s"] - 1, 3)
        headline["cube_memory_vs_din"][str(length)] = round(cube["peak_rss_mb"] / din["peak_rss_mb"], 3)
        print(json.dumps({**cube, "cost_over_din": headline["cube_cost_over_din"][str(length)]}), flush=True)
        if length > args.top_k:
            top = in_child("cube", length, args.steps, args.batch, args.top_k, scale)
            selected[length] = top["samples_per_s"]
            print(json.dumps({**top, "cost_over_din": round(din["samples_per_s"] / top["samples_per_s"] - 1, 3),
                              "cost_over_cube": round(cube["samples_per_s"] / top["samples_per_s"] - 1, 3)}), flush=True)
    if len(selected) > 1:  # how CUBE's cost with top-K grows with the length, from the shortest measured
        shortest = min(selected)
        headline[f"cube_top{args.top_k}_cost_vs_length_{shortest}"] = {
            str(length): round(selected[shortest] / rate, 3) for length, rate in selected.items()}
    switch = version_switch(args.items)
    print(json.dumps(switch), flush=True)
    print(json.dumps({**headline, "version_switch_seconds": switch["switch_seconds"], "items": switch["items"]}))


if __name__ == "__main__":
    main()
