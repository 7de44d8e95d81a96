"""Simulation speed and memory: items/s, events/s and peak RSS, for a world and one 10x larger.

Each world is simulated in its own process so its peak RSS is its own; the memory of
its image-drawing workers is sampled and added up. Baselines measured
in the same run: drawing + PNG-encoding images alone (the floor of the catalogue's cost),
and the small world's peak RSS (streaming keeps the 10x world's RSS close to it).
Prints one JSON object per line; the last line is the headline.

    python benchmarks/simulate.py                  # 5,000 and 50,000 items
    python benchmarks/simulate.py --items 100000   # 100,000 and 1,000,000 items
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RUN_ONE = """
import json, sys
from pathlib import Path
from moon import ui
from moon.config import load_config
from moon.sources.simulate.write import simulate
ui.set_quiet(True)
counts = simulate(load_config(None, sys.argv[2:]), Path(sys.argv[1]))
print(json.dumps(counts))
"""


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants (the image-drawing workers), in MiB."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    total_kib = 0
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            total_kib += int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
        except OSError:
            continue
    return total_kib / 1024


def simulate_in_child(items: int, users: int, days: int, run_dir: str) -> dict:
    overrides = [f"world.items={items}", f"behaviour.users={users}", f"behaviour.days={days}", "name=bench"]
    child = subprocess.Popen([sys.executable, "-c", RUN_ONE, run_dir, *overrides], stdout=subprocess.PIPE, text=True)
    peak_tree = 0.0
    sampler_done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not sampler_done.wait(0.25):
            peak_tree = max(peak_tree, tree_rss_mb(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = child.stdout.read()
    sampler_done.set()
    sampler.join()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"simulation of {items} items failed (status {status})")
    counts = json.loads(output.strip().splitlines()[-1])
    events_seconds = counts["seconds"] - counts["items_seconds"]
    return {
        "items": items,
        "events": counts["events"],
        "items_per_s": round(items / counts["items_seconds"], 1),
        "events_per_s": round(counts["events"] / events_seconds, 1),
        "seconds": round(counts["seconds"], 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # largest single process; Linux reports KiB
        "peak_tree_rss_mb": round(peak_tree, 1),  # main process + drawing workers, sampled every 0.25 s
    }


def render_only(items: int) -> float:
    """Items/s of drawing and encoding catalogue images alone, the catalogue's irreducible cost."""
    from moon.config import load_config
    from moon.sources.simulate.catalog import build_catalog, look
    from moon.sources.simulate.render import draw_item, encode_png

    config = load_config(None, [f"world.items={items}"])
    catalog = build_catalog(config.world, config.behaviour, config.seed)
    started = time.perf_counter()
    for i in range(items):
        encode_png(draw_item(look(catalog, i), config.world.image_size))
    return items / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000, help="items of the smaller world (the larger has 10x)")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--days", type=int, default=14)
    args = parser.parse_args()
    baseline = render_only(min(args.items, 3000))
    print(json.dumps({"baseline": "draw+png only", "items_per_s": round(baseline, 1)}), flush=True)
    results = []
    for items in (args.items, 10 * args.items):
        with tempfile.TemporaryDirectory() as run_dir:
            results.append(simulate_in_child(items, args.users, args.days, run_dir))
        print(json.dumps(results[-1]), flush=True)
    small, large = results
    print(json.dumps({
        "items_per_s": large["items_per_s"],
        "events_per_s": large["events_per_s"],
        "peak_rss_mb": large["peak_rss_mb"],
        "peak_tree_rss_mb": large["peak_tree_rss_mb"],
        "items_per_s_vs_draw_only": round(large["items_per_s"] / baseline, 3),
        "peak_tree_rss_10x_items_vs_1x": round(large["peak_tree_rss_mb"] / small["peak_tree_rss_mb"], 3),
    }))


if __name__ == "__main__":
    main()
