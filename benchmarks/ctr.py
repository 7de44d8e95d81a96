"""CTR training speed and memory: CUBE against DIN at behaviour lengths 64 and 1,000, and the time
to switch representation versions for a million items.

The samples are synthetic, shaped like the demo's (ID vocabularies, a catalogue with frozen
64-dim float16 representations, users whose time-ordered behaviour is long enough for every
length), so lengths the demo world never reaches can be measured. Each (model, length) pair
trains `--steps` Adam steps through the same code as `moon ctr train` (CtrData.batch -> model ->
BCE), in a child process of its own so its peak RSS (ru_maxrss) is its own. Baseline measured
in the same run: DIN at the same length; the headline is CUBE's cost over it.

The version switch writes a store version of `--items` random unit vectors and times
`RepresentationTable.load` for all of them (what `ctr.representations=<version>` does when a
model loads), against reading the same shards with pyarrow alone.

    python benchmarks/ctr.py                       # lengths 64 and 1000, 1M items
    python benchmarks/ctr.py --lengths 64 --items 100000

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
print(json.dumps(train_steps({model!r}, {length}, {steps}, {batch})))
"""


def synthetic(length: int):
    """CtrData, feature spec, config and representation tables of a synthetic world."""
    import pyarrow as pa
    import torch

    from moon.config import load_config
    from moon.ctr.data import CtrData, Sequences, Vocab
    from moon.ctr.features import load_spec
    from moon.ctr.representations import RepresentationTable
    from moon.vectors import unit_rows

    rng = np.random.default_rng(0)
    config = load_config(None, [f"ctr.max_len={length}", f"ctr.query_max_len={min(length, 64)}"])
    spec = load_spec(config)
    history = length + 50  # every sample sees a full sequence
    events = USERS * history
    user_of_sample = rng.integers(0, USERS, SAMPLES)
    end = user_of_sample * history + history  # each sample sees all of its user's events
    start = user_of_sample * history

    def vocab(n):
        return Vocab(pa.array([str(i) for i in range(n)]))

    samples = {"user": user_of_sample + 2, "item_row": rng.integers(1, ITEMS + 1, SAMPLES),
               "query_row": rng.integers(1, QUERIES + 1, SAMPLES), "query_code": rng.integers(1, QUERIES, SAMPLES),
               "query_kind": rng.integers(2, 4, SAMPLES), "position": rng.integers(1, 11, SAMPLES).astype(np.float32),
               "label": (rng.random(SAMPLES) < 0.15).astype(np.float32), "day": np.zeros(SAMPLES, np.int16)}
    leaf = rng.integers(0, 60, ITEMS).astype(str)  # the items as segments read them; training reads none of it
    catalogue = pa.table({"item_id": [str(i) for i in range(ITEMS)], "shop_id": rng.integers(0, 50, ITEMS).astype(str),
                          "category": [["root", f"leaf{code}"] for code in leaf], "price": rng.random(ITEMS),
                          "created_at": pa.nulls(ITEMS, pa.timestamp("ms", tz="UTC")), "leaf": leaf})
    data = CtrData(
        samples=samples, splits={"train": np.arange(SAMPLES), "valid": np.arange(0), "test": np.arange(0)},
        items={"item_id": np.r_[0, rng.integers(1, ITEMS, ITEMS)], "shop_id": np.r_[0, rng.integers(2, 50, ITEMS)],
               "leaf": np.r_[0, rng.integers(2, 60, ITEMS)], "price": rng.random(ITEMS + 1).astype(np.float32)},
        behaviour=Sequences({"item_row": rng.integers(1, ITEMS + 1, events), "action": rng.integers(2, 5, events)},
                            start, end),
        queries=Sequences({"query_row": rng.integers(1, QUERIES + 1, events), "query_code": rng.integers(1, QUERIES, events)},
                          start, end),
        vocabs={"user_id": vocab(USERS), "item_id": vocab(ITEMS), "shop_id": vocab(50), "leaf": vocab(60),
                "past_queries": vocab(QUERIES), "behaviour_actions": vocab(3), "query_kind": vocab(2)},
        item_ids=[str(i) for i in range(ITEMS)], query_ids=[str(i) for i in range(QUERIES)],
        user_ids=user_of_sample.astype(str), request_ids=np.arange(SAMPLES).astype(str),
        catalogue=catalogue, period_start=0)

    def table(n: int) -> RepresentationTable:
        vectors = np.r_[np.zeros((1, DIM)), unit_rows(rng.standard_normal((n, DIM)))].astype(np.float16)
        return RepresentationTable("synthetic", DIM, torch.from_numpy(vectors), torch.ones(n + 1, dtype=torch.bool))

    return data, spec, config, {"item_id": table(ITEMS), "query_id": table(QUERIES)}


def train_steps(model_name: str, length: int, steps: int, batch_size: int) -> dict:
    """Samples/s of `steps` training steps (after 3 warm-up steps) and this process's peak RSS."""
    import torch

    from moon.ctr.models import MODELS
    from moon.ctr.train import make_optimiser

    torch.manual_seed(0)
    data, spec, config, tables = synthetic(length)
    model = MODELS[model_name](spec, data, config.ctr, tables)
    optimiser = make_optimiser(model, config)
    batches = data.batches("train", batch_size, length, config.ctr.query_max_len, seed=0)
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
    return {"model": model_name, "length": length, "samples_per_s": round(steps * batch_size / timed),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def in_child(model: str, length: int, steps: int, batch: int) -> dict:
    code = CHILD.format(here=str(Path(__file__).parent), model=model, length=length, steps=steps, batch=batch)
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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--items", type=int, default=1_000_000)
    args = parser.parse_args()
    ratios = {}
    for length in args.lengths:
        din = in_child("din", length, args.steps, args.batch)
        print(json.dumps({"baseline": "DIN", **din}), flush=True)
        cube = in_child("cube", length, args.steps, args.batch)
        ratios[length] = {"cube_cost_over_din": round(din["samples_per_s"] / cube["samples_per_s"] - 1, 3),
                          "cube_memory_vs_din": round(cube["peak_rss_mb"] / din["peak_rss_mb"], 3)}
        print(json.dumps({**cube, **ratios[length]}), flush=True)
    switch = version_switch(args.items)
    print(json.dumps(switch), flush=True)
    print(json.dumps({"cube_cost_over_din": {str(k): v["cube_cost_over_din"] for k, v in ratios.items()},
                      "cube_memory_vs_din": {str(k): v["cube_memory_vs_din"] for k, v in ratios.items()},
                      "version_switch_seconds": switch["switch_seconds"], "items": switch["items"]}))


if __name__ == "__main__":
    main()
