"""The RMT paper's tables as sweep grids (``--grid``): the published rows and figures are data
(``paper_grids.json``, from PAPERS.md section 4); this module turns each row into config overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

PUBLISHED = Path(__file__).with_name("paper_grids.json")

# The task tables do not give memory sizes: RMT uses 10 memory tokens (the paper preset) and Tr-XL a
# cache of 10 states, the same number of memory vectors; RMT trains with full BPTT (window), as the
# algorithmic paper preset does.
TASK_MEMORY = {"none": {"memory.kind": "none"},
               "xl": {"memory.kind": "xl", "memory.xl_len": 10},
               "rmt": {"memory.kind": "rmt", "memory.num_tokens": 10, "memory.bptt_unroll": -1}}
TASK_MODEL_NAMES = {"none": "no memory", "xl": "Tr-XL", "rmt": "RMT"}
# A sample's length over the task length: copy writes the source twice after it, reverse once.
TOTAL_FACTOR = {"copy": 3, "reverse": 2}


@dataclass(frozen=True)
class PaperRow:
    """One row of a published table: the overrides that reproduce it and the published figure."""

    label: str
    overrides: Mapping[str, Any]
    published: float
    steps_factor: int = 1  # "twice the steps" rows train train.max_steps x this


@dataclass(frozen=True)
class PaperGrid:
    name: str
    job: str
    metric: str
    base: Mapping[str, Any]  # applied before your overrides (you may scale these, e.g. data.segment_len)
    rows: tuple[PaperRow, ...]
    source: str

    @property
    def row_keys(self) -> set[str]:
        return {k for row in self.rows for k in row.overrides}


def memory_overrides(setting: Mapping[str, Any]) -> dict[str, Any]:
    """A row's memory keys in full (the ones it leaves out are 0), then anything else it sets."""
    return {"memory.kind": setting["memory.kind"], "memory.num_tokens": 0, "memory.xl_len": 0,
            "memory.bptt_unroll": 0, **setting}


def lm_rows(rows: list[Mapping[str, Any]]) -> tuple[PaperRow, ...]:
    return tuple(PaperRow(r["row"], memory_overrides(r["set"]), r["published"], r.get("steps_factor", 1))
                 for r in rows)


def task_rows(task: str, cells: list[Mapping[str, Any]]) -> tuple[PaperRow, ...]:
    """One row per published cell: a task shape (length over segments) and a model."""
    rows = []
    for cell in cells:
        length, segments = cell["data.task_length"], cell["data.num_segments"]
        shape = {"data.task_length": length, "data.num_segments": segments,
                 "data.segment_len": TOTAL_FACTOR[task] * length // segments}
        for model, value in cell["published"].items():
            rows.append(PaperRow(f"{task} {length} / {segments} segments, {TASK_MODEL_NAMES[model]}",
                                 {**shape, **memory_overrides(TASK_MEMORY[model])}, value))
    return tuple(rows)


def load_grids(path: Path = PUBLISHED) -> dict[str, PaperGrid]:
    grids = {}
    for name, table in json.loads(path.read_text()).items():
        rows = lm_rows(table["rows"]) if "rows" in table else task_rows(table["base"]["data.task"], table["cells"])
        grids[name] = PaperGrid(name, table["job"], table["metric"], table["base"], rows, table["source"])
    return grids


GRIDS: dict[str, PaperGrid] = load_grids()
