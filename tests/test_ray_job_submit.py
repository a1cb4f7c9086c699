"""The product's main path: `ray start --head` (127.0.0.1, token auth) + `ray job submit -- python
jobs/lm_wikitext.py --preset smoke`, tracked in a real MLflow server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import RAY, REPO, free_port, start_ray_node, stop_process_group

pytestmark = pytest.mark.slow


def test_ray_job_submit_smoke_job_lands_in_mlflow(tmp_path, mlflow_server, data_cache):
    import mlflow

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}
    dashboard = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = start_ray_node(["--head", "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
                           "--dashboard-port", str(dashboard), "--num-cpus", "2", "--temp-dir", ray_tmp],
                          env, tmp_path / "head.log")
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_dashboard(address, head)
        submit = [RAY, "job", "submit", "--address", address, "--", sys.executable,
                  str(REPO / "jobs" / "lm_wikitext.py"), "--preset", "smoke", "--mlflow.tracking_uri", mlflow_server,
                  "--mlflow.experiment", "submit_test", "--storage.path", str(tmp_path / "runs"),
                  "--data.cache_dir", data_cache]
        agent_deadline = time.time() + 180  # the head's job agent comes up after the dashboard (slowly when loaded)
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=480)
            if "No available agent to submit job" not in job.stderr + job.stdout:
                break
            assert time.time() < agent_deadline, "no job agent: " + _agent_log_tail(ray_tmp)
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "done: val_loss=" in job.stdout and "mlflow run: " in job.stdout
    finally:
        stop_process_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("submit_test").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("val_ppl", "peak_mem_bytes", "memory_state_bytes", "train_loss", "tokens_per_s"):
        assert key in run.data.metrics, key
    assert run.data.metrics["memory_state_bytes"] == 4 * 64 * 4  # 4 memory tokens x d_model 64 x fp32
    assert run.data.params["memory.kind"] == "rmt"
    assert run.data.tags["ray_job_id"]


def _agent_log_tail(ray_tmp: str) -> str:
    logs = sorted(Path(ray_tmp).glob("session_*/logs/dashboard_agent.log"))
    return logs[-1].read_text()[-2000:] if logs else "(no dashboard_agent.log)"


def _wait_dashboard(address: str, head: subprocess.Popen, timeout: float = 120) -> None:
    """The job server answers (with token auth on, an unauthenticated request is refused, not dropped)."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the Ray dashboard did not come up")
