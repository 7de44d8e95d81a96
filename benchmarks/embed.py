"""Batch embedding speed of the tiny preset: catalogue items/s through the code path of `moon embed`
(`represent.encoders.TrainedEncoder.encode_items`, served view, `store.batch_size` items per forward pass), the
achieved FLOP/s against this machine's matmul peak measured in the same run, and the share of
the time spent building model inputs (image decoding, tokenising) rather than in the model; and
the speed with the multimodal rotary positions cached per layout against the library's per-row
computation.

    python benchmarks/embed.py [--run-dir runs/demo] [--items 2000]

Needs a run directory with an items table (`moon demo` makes runs/demo). The model is the tiny
preset (the embedded demo config), untrained: speed does not depend on the weights. Prints JSON
lines; the last is the headline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from torch.utils.flop_counter import FlopCounterMode
from train import matmul_peak  # benchmarks/train.py, beside this file

from moon import ui
from moon.config import load_config
from moon.io.tables import dataset
from moon.model.embedder import Embedder
from moon.model.inputs import forget_images
from moon.model.views import ItemViews
from moon.represent.batch import read_rows
from moon.represent.encoders import TrainedEncoder


def embedder(items: pa.Table, overrides: list[str]) -> tuple[Embedder, int]:
    """The tiny preset's embedder, set up as `moon embed` sets it up, and its `store.batch_size`."""
    config = load_config(None, overrides)
    model = Embedder.create(config.model, ItemViews(items).texts(), seed=0)
    return model.eval(), config.store.batch_size


def encode(model: Embedder, items: pa.Table, batch_size: int) -> np.ndarray:
    """What `moon embed` does to one partition of the catalogue."""
    encoder = TrainedEncoder(Path("."), "tiny", None, batch_size, embedder=model)  # the model is in memory only
    return encoder.encode_items(items, lambda n=1: None)


def items_per_second(model: Embedder, items: pa.Table, batch_size: int) -> tuple[float, float]:
    """(items/s, seconds) of one pass over `items`, after a one-batch warm-up."""
    encode(model, items.slice(0, batch_size), batch_size)
    forget_images()  # `moon embed` sees each item once
    start = time.perf_counter()
    encode(model, items, batch_size)
    seconds = time.perf_counter() - start
    return items.num_rows / seconds, seconds


def input_seconds(model: Embedder, items: pa.Table, batch_size: int) -> float:
    """Seconds of one pass that only builds the model inputs (item texts, image decoding and resizing,
    tokenising): the part of the embedding time no matmul speeds up."""
    forget_images()
    start = time.perf_counter()
    views = ItemViews(items)
    for first in range(0, len(views), batch_size):
        model.collate(views.inputs(range(first, min(first + batch_size, len(views))), model.settings.served_view))
    return time.perf_counter() - start


def total_flops(model: Embedder, items: pa.Table, batch_size: int) -> int:
    """FLOPs of one pass over `items` (the same batches as the timed pass)."""
    with FlopCounterMode(display=False) as counter:
        encode(model, items, batch_size)
    return counter.get_total_flops()


def rotary_cache_speed(model: Embedder, items: pa.Table, batch_size: int, repeats: int = 3) -> None:
    """Items/s with the rotary positions cached per layout (as `moon embed` runs) against the library
    computing them for every row, alternated."""
    cached = model.positions
    ratios = []
    for _ in range(repeats):
        with_cache, _ = items_per_second(model, items, batch_size)
        model.positions = lambda batch: None  # the library's own positions, row by row
        library, _ = items_per_second(model, items, batch_size)
        model.positions = cached
        ratios.append(with_cache / library)
    print(json.dumps({"rotary_cache_speed_ratio_runs": [round(r, 3) for r in ratios],
                      "rotary_cache_speed_ratio_median": round(sorted(ratios)[len(ratios) // 2], 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--items", type=int, default=2000, help="catalogue items to embed (the first ones)")
    args = parser.parse_args()
    ui.set_quiet(True)
    catalogue = dataset(Path(args.run_dir), "items")
    items = read_rows(catalogue, np.arange(min(args.items, catalogue.count_rows())))
    model, batch_size = embedder(items, [])
    peak = matmul_peak()
    rate, seconds = items_per_second(model, items, batch_size)
    peak = max(peak, matmul_peak())  # the best of before and after: a slow spell of the machine is not the peak
    print(json.dumps({"matmul_peak_gflops": round(peak / 1e9, 1)}))
    inputs = input_seconds(model, items, batch_size)
    print(json.dumps({"items": items.num_rows, "batch_size": batch_size, "seconds": round(seconds, 2),
                      "items_per_s": round(rate, 1), "input_building_share": round(inputs / seconds, 3)}))
    rotary_cache_speed(model, items, batch_size)

    # FLOPs are counted with eager attention: the CPU sdpa kernel reports none
    counted, _ = embedder(items, ["model.attn_implementation=eager"])
    flops = total_flops(counted, items, batch_size)
    achieved = flops / seconds
    print(json.dumps({
        "items_per_s": round(rate, 1),
        "flops_per_item": flops // items.num_rows,
        "achieved_gflops": round(achieved / 1e9, 2),
        "fraction_of_matmul_peak": round(achieved / peak, 4),
    }))


if __name__ == "__main__":
    main()
