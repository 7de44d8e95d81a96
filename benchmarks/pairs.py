"""Pair-building speed and memory on large simulated logs: events/s of stage 1 and stage 2, peak RSS.

The log is the default simulated world's behaviour log, replayed by more users (each copy
gets its own user and session ids) until it holds --events rows; one run measures every
size given (10 and 30 million events by default). `moon pairs` runs in a child process
per size, so its peak RSS (ru_maxrss) is its own. Baselines measured in the same run: a
plain streamed scan of the same events columns (the floor of reading the log), and the
smallest log's peak RSS (memory should stay flat as the log grows: `peak_rss_vs_smallest`).
Prints one JSON object per line; the last line is the headline.

    python benchmarks/pairs.py                            # 10 and 30 million events
    python benchmarks/pairs.py --events 1000000 3000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

RUN_PAIRS = """
import json, sys
from pathlib import Path
from moon import ui
from moon.config import load_config
from moon.pairs.build import build_pairs
ui.set_quiet(True)
accounting = build_pairs(load_config(None, []), Path(sys.argv[1]))
print(json.dumps(accounting.totals["seconds"]))
"""


def replay_log(world: Path, run_dir: Path, events: int) -> int:
    """Copies the world's items and writes its events again and again, as other users, up to `events` rows."""
    from moon.io import schema
    from moon.io.tables import TableWriter, read_manifest, read_table

    for table in ("items",):
        (run_dir / table).mkdir(parents=True)
        for file in (world / table).iterdir():
            (run_dir / table / file.name).write_bytes(file.read_bytes())
    base = read_table(world, "events")
    copies = -(-events // base.num_rows)
    with TableWriter(run_dir, "events", schema.EVENTS) as writer:
        for copy in range(copies):
            rows = base.slice(0, min(base.num_rows, events - copy * base.num_rows))
            for name in ("user_id", "session_id"):
                rows = rows.set_column(rows.schema.get_field_index(name), name, pc.binary_join_element_wise(rows[name], pa.scalar(f"r{copy}"), "-"))
            writer.write(rows)
        manifest = read_manifest(world, "events")
        writer.commit(stage="benchmark replay", period_start=manifest["period_start"], days=manifest["days"], simulated=True)
    return writer.rows


def scan_events_per_s(run_dir: Path) -> float:
    from moon.io.tables import dataset
    from moon.pairs.log import INTERACTION_COLUMNS

    started = time.perf_counter()
    rows = 0
    for batch in dataset(run_dir, "events").to_batches(columns=INTERACTION_COLUMNS, batch_size=200_000):
        rows += batch.num_rows
        pc.equal(batch["action"], "impression")
    return rows / (time.perf_counter() - started)


def measure(world: Path, run_dir: Path, size: int) -> dict:
    """Replays the log to `size` events, then times a streamed scan and `moon pairs` on it."""
    events = replay_log(world, run_dir, size)
    scan = scan_events_per_s(run_dir)
    print(json.dumps({"baseline": "streamed scan of the events", "events": events, "events_per_s": round(scan)}), flush=True)
    child = subprocess.Popen([sys.executable, "-c", RUN_PAIRS, str(run_dir)], stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"moon pairs failed on {events:,} events (status {status})")
    seconds = json.loads(output.strip().splitlines()[-1])
    stage1 = events / (seconds["read log"] + seconds["stage 1"])
    stage2 = events / (seconds["near duplicates"] + seconds["stage 2"])
    result = {
        "events": events,
        "seconds": seconds,
        "stage1_events_per_s": round(stage1),
        "stage2_events_per_s": round(stage2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stage1_vs_scan": round(stage1 / scan, 3),
        "stage2_vs_scan": round(stage2 / scan, 3),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[10_000_000, 30_000_000],
                        help="log sizes to measure, smallest first")
    args = parser.parse_args()
    from moon import ui
    from moon.config import load_config
    from moon.sources.simulate.write import simulate

    ui.set_quiet(True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        simulate(load_config(), world)
        for size in sorted(args.events):
            run_dir = Path(tmp) / f"run-{size}"
            results.append(measure(world, run_dir, size))
            shutil.rmtree(run_dir)  # one replayed log on disk at a time
    smallest = results[0]
    print(json.dumps({
        "events": [r["events"] for r in results],
        "peak_rss_mb": [r["peak_rss_mb"] for r in results],
        "peak_rss_vs_smallest": [round(r["peak_rss_mb"] / smallest["peak_rss_mb"], 3) for r in results],
        "stage1_vs_scan": [r["stage1_vs_scan"] for r in results],
        "stage2_vs_scan": [r["stage2_vs_scan"] for r in results],
    }))


if __name__ == "__main__":
    main()
