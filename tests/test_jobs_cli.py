"""The jobs' command line: bad input is one line on stderr and exit code 2, before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def run_job(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "lm_wikitext.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--memory.foo", "1"], "unknown config key 'memory.foo' (see --help for the keys)"),
    (["--memory.num_tokens", "-3"], "memory.num_tokens must be >= 0, got -3"),
    (["--deepspeed.zero_stage", "5"], "deepspeed.zero_stage must be one of 0, 1, 2, 3, got 5"),
    (["--train.lr=abc"], "train.lr must be a number, got 'abc'"),
    (["--preset", "huge"], "--preset must be one of smoke, paper, got 'huge'"),
    (["--memory.kind", "lstm"], "memory.kind must be one of none, memtr, xl, rmt, rmt_xl, infinite, got 'lstm'"),
])
def test_bad_flag_is_one_line_and_exit_2(args, message, tmp_path):
    proc = run_job(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {message}"]
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_unwritable_storage_path_fails_before_workers(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_job(["--storage.path", str(blocker / "runs")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: storage.path must be writable") and str(blocker / "runs") in line
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_corpus_file_fails_before_workers(tmp_path):
    proc = run_job(["--data.dataset", "wikitext-103", "--data.path", str(tmp_path / "nowhere"),
                    "--storage.path", str(tmp_path / "runs")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "nowhere" in line
    assert not (tmp_path / "mlflow.db").exists()


def test_help_lists_every_dotted_key(tmp_path):
    proc = run_job(["--help"], tmp_path)
    assert proc.returncode == 0
    for key in ("--memory.num_tokens", "--memory.bptt_unroll", "--deepspeed.zero_stage", "--storage.path"):
        assert key in proc.stdout
