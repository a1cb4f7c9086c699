"""Multi-node on one machine: two Ray nodes, one DeepSpeed ZeRO-2 worker on each, checkpoint, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_two_nodes_train_zero2_checkpoint_and_resume(data_cache):
    # Short directory: Ray's per-node socket paths must fit in 107 bytes.
    workdir = tempfile.mkdtemp(prefix="mn", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "", "RAY_TMPDIR": workdir}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_job.py"), workdir, data_cache],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(seen["nodes"])) == 2
    assert sorted(seen["writer_nodes"]) == sorted(seen["nodes"]), "both ranks on one node"
    assert seen["first_step"] == 4 and seen["resumed_step"] == 6
    assert seen["resumed_val_loss"] < seen["first_val_loss"]
