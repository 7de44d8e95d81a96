"""Accounting for data-cleaning steps: every row a step takes in is either kept or dropped for a reason.

Each `Step` checks its own balance when recorded, so a step that loses rows without
a reason fails loudly instead of going unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Step:
    stage: str  # e.g. "interactions", "stage 1", "stage 2"
    name: str
    rows_in: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def __post_init__(self) -> None:
        self.dropped = {reason: int(n) for reason, n in self.dropped.items() if n}
        if self.rows_in != self.kept + sum(self.dropped.values()):
            raise AssertionError(
                f"{self.stage} / {self.name}: {self.rows_in} rows in, {self.kept} kept and "
                f"{sum(self.dropped.values())} dropped ({self.dropped}): the step lost rows without a reason"
            )


@dataclass
class Accounting:
    steps: list[Step] = field(default_factory=list)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)  # e.g. rows per split of each output

    def record(self, stage: str, name: str, rows_in: int, kept: int, **dropped: int) -> Step:
        step = Step(stage, name, int(rows_in), int(kept), dropped)
        self.steps.append(step)
        return step

    def rows(self) -> list[tuple]:
        """One line per step, for `ui.print_table`."""
        return [self.row(step) for step in self.steps]

    @staticmethod
    def row(step: Step) -> tuple:
        dropped = "; ".join(f"{n:,} {reason}" for reason, n in step.dropped.items()) or "-"
        return step.stage, step.name, step.rows_in, step.kept, dropped

    def to_json(self) -> dict:
        return {"steps": [asdict(step) for step in self.steps], "totals": self.totals}

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
