"""The benchmarks still run: each one's smoke mode, seconds long, through its own command line.
(A benchmark whose code drifts from the library's fails here, not when someone next measures.)"""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_the_ctr_benchmark_runs_and_prints_its_headline():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "ctr.py"), "--smoke"], check=True, capture_output=True,
                         text=True, timeout=300).stdout
    lines = [json.loads(line) for line in out.strip().splitlines()]
    headline = lines[-1]
    assert set(headline["cube_cost_over_din"]) == {"8", "32"}
    assert set(headline["cube_top4_cost_vs_length_8"]) == {"8", "32"}
    assert {line.get("model") for line in lines} >= {"din", "cube", "cube-top4"}
    assert all(line["samples_per_s"] > 0 for line in lines if "samples_per_s" in line)
