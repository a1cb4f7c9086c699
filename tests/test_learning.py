"""It learns: RMT solves copy over 3 segments on CPU through the real Ray + DeepSpeed path; a model
without memory cannot (the target lies in segments after the source)."""

from __future__ import annotations

import time

import pytest

from rmt_dist.config import from_flat
from rmt_dist.presets import PRESETS
from rmt_dist.train.driver import run_training

pytestmark = pytest.mark.slow


def copy_config(tmp_path, data_cache, kind: str):
    return from_flat({**PRESETS["algorithmic"]["smoke"], "memory.kind": kind, "data.cache_dir": data_cache,
                      "storage.path": str(tmp_path / kind), "mlflow.enabled": False})


def test_rmt_learns_copy_within_3_minutes_and_no_memory_does_not(tmp_path, data_cache, ray_local):
    started = time.perf_counter()
    rmt = run_training(copy_config(tmp_path, data_cache, "rmt"), "test_copy", run_name="rmt")
    elapsed = time.perf_counter() - started
    assert rmt.metrics["val_acc"] >= 0.9, rmt.metrics
    assert elapsed < 180, f"took {elapsed:.0f} s"

    none = run_training(copy_config(tmp_path, data_cache, "none"), "test_copy", run_name="none")
    assert none.metrics["val_acc"] < 0.6, none.metrics
