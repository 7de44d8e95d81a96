"""Pair-building speed and memory on a large simulated log: events/s of stage 1 and stage 2, peak RSS.

The log is the default simulated world's behaviour log, replayed by more users (each copy
gets its own user and session ids) until it holds --events rows. Baseline measured in the
same run: a plain streamed scan of the same events columns (the floor of reading the log).
Prints one JSON object per line; the last line is the headline.

    python benchmarks/pairs.py                      # 10 million events
    python benchmarks/pairs.py --events 1000000
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    args = parser.parse_args()
    from moon import ui
    from moon.config import load_config
    from moon.sources.simulate.write import simulate

    ui.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        world, run_dir = Path(tmp) / "world", Path(tmp) / "run"
        simulate(load_config(), world)
        events = replay_log(world, run_dir, args.events)
        scan = scan_events_per_s(run_dir)
        print(json.dumps({"baseline": "streamed scan of the events", "events": events, "events_per_s": round(scan)}), flush=True)
        child = subprocess.Popen([sys.executable, "-c", RUN_PAIRS, str(run_dir)], stdout=subprocess.PIPE, text=True)
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            raise SystemExit(f"moon pairs failed (status {status})")
        seconds = json.loads(output.strip().splitlines()[-1])
    print(json.dumps({"seconds": seconds}), flush=True)
    stage1 = events / (seconds["read log"] + seconds["stage 1"])
    stage2 = events / (seconds["near duplicates"] + seconds["stage 2"])
    print(json.dumps({
        "events": events,
        "stage1_events_per_s": round(stage1),
        "stage2_events_per_s": round(stage2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stage1_vs_scan": round(stage1 / scan, 3),
    }))


if __name__ == "__main__":
    main()
