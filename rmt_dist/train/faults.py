"""Fault injection for the fault-tolerance tests: ``RMT_DIST_FAULT_AT_STEP=STEP:RANK:MARKER_FILE`` makes
worker RANK exit hard (no cleanup, as a killed process) when it reports STEP, once: the marker file
records that it happened, so the worker group Ray restarts from the last checkpoint runs on. The driver
forwards the variable to the workers (``driver.FORWARDED_ENV``); Ray's worker reporter checks it."""

from __future__ import annotations

import os
from pathlib import Path

FAULT_ENV = "RMT_DIST_FAULT_AT_STEP"


def exit_if_due(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if step == int(at_step) and rank == int(at_rank) and not Path(marker).exists():
        Path(marker).write_text("killed")
        os._exit(1)
