"""What a sweep keeps under ``storage.path/<sweep name>/`` (local or S3).

``sweep.json`` (what must match to resume, the parent run id), ``ended_trials.json`` and ``report/``
are ours; ``tune/`` is the Tune experiment (Tune re-uploads its own directory from a staging copy, so
our files live beside it); ``train_<trial id>/`` is each trial's Train run and checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pyarrow.fs as pafs

from rmt_dist.config import StorageConfig
from rmt_dist.storage import Storage, read_text, resolve, write_text

TUNE_DIR = "tune"
STATE_FILE = "sweep.json"
# Trials that really ended (done, stopped early, failed), kept across resumes. Tune marks the trials it
# was running when interrupted (Ctrl-C) TERMINATED in memory too, without the on_trial_complete event,
# so its statuses cannot tell an interrupted trial from a finished one.
ENDED_FILE = "ended_trials.json"
REPORT_DIR = "report"


def sweep_storage(storage_cfg: StorageConfig, sweep_name: str) -> Storage:
    """The Storage under which a sweep keeps its Tune experiment and its trials' Train runs."""
    root = resolve(storage_cfg)
    return Storage(uri=f"{root.uri}/{sweep_name}", filesystem=root.filesystem, ray_path=f"{root.ray_path}/{sweep_name}")


def read_state(storage: Storage) -> dict[str, Any] | None:
    text = read_text(storage, f"{storage.ray_path}/{STATE_FILE}")
    return json.loads(text) if text else None


def write_state(storage: Storage, state: dict[str, Any]) -> None:
    write_text(storage, f"{storage.ray_path}/{STATE_FILE}", json.dumps(state, indent=1, default=str))


def read_ended(storage: Storage) -> dict[str, str]:
    """Trial id -> done | stopped | failed, for the trials that ended."""
    text = read_text(storage, f"{storage.ray_path}/{ENDED_FILE}")
    return json.loads(text) if text else {}


def mark_ended(storage: Storage, trial_id: str, status: str) -> None:
    ended = read_ended(storage)
    ended[trial_id] = status
    write_text(storage, f"{storage.ray_path}/{ENDED_FILE}", json.dumps(ended, indent=1))


def save_report(storage: Storage, files: Sequence[Path]) -> str:
    """Copy the report's files into ``report/``; returns where they are (a local path or an s3:// URI)."""
    fs = storage.filesystem or pafs.LocalFileSystem()
    fs.create_dir(f"{storage.ray_path}/{REPORT_DIR}", recursive=True)
    for f in files:
        pafs.copy_files(str(f), f"{storage.ray_path}/{REPORT_DIR}/{f.name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    return f"{storage.uri}/{REPORT_DIR}"
