"""Multi-node on one machine: two `ray start` nodes on 127.0.0.1 (token auth), one DeepSpeed ZeRO-2
worker on each, checkpoint, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, start_ray_node, stop_process_group

pytestmark = pytest.mark.slow

def test_two_nodes_train_zero2_checkpoint_and_resume(data_cache):
    workdir = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}
    head = start_ray_node(["--num-cpus", "1", "--head", "--port", str(port), "--include-dashboard", "false",
                           "--temp-dir", f"{workdir}/h"], env, Path(workdir) / "head.log")
    nodes = [head]
    try:
        time.sleep(5)
        nodes.append(start_ray_node(["--num-cpus", "1", "--address", f"127.0.0.1:{port}"], env,
                                    Path(workdir) / "worker.log"))
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_job.py"), workdir, data_cache],
                              env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        for node in reversed(nodes):
            stop_process_group(node)
        shutil.rmtree(workdir, ignore_errors=True)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(seen["nodes"])) == 2
    assert sorted(seen["writer_nodes"]) == sorted(seen["nodes"]), "both ranks on one node"
    assert seen["first_step"] == 4 and seen["resumed_step"] == 6
    assert seen["resumed_val_loss"] < seen["first_val_loss"]
