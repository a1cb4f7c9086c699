"""Shared test setup: deterministic single-threaded torch, and the real services the tests run against
(local Ray, an MLflow server on 127.0.0.1 with SQLite, moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# Test credentials for moto's S3 server, set before any Ray process starts so workers inherit them.
# The secret is distinctive so tests can prove it never reaches a log, a param or a checkpoint.
S3_SECRET = "testing-secret-DO-NOT-LOG-7f3a"
os.environ.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


RAY = str(Path(sys.executable).with_name("ray"))
# `ray start` options whose defaults are fixed ports (52365, 10001, 8265, ...): another Ray on this machine
# (the session's local Ray, a node still shutting down) may hold them, and a dashboard agent that cannot
# bind leaves the head answering "No available agent to submit job" forever. Every node gets free ones.
_FIXED_PORT_OPTIONS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                       "--metrics-export-port", "--ray-client-server-port", "--dashboard-port")


def start_ray_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block` on 127.0.0.1 in its own process group (stop it with stop_process_group)."""
    ports = [arg for option in _FIXED_PORT_OPTIONS if option not in args for arg in (option, str(free_port()))]
    return subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1", *ports, *args],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` node by its process group only — never `ray stop`, which would end
    every Ray on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def gloo_world() -> Iterator[None]:
    """``torch.distributed`` on gloo at world size 1 in this process, for in-process DeepSpeed engines.
    One for the whole session: DeepSpeed caches the world group (``deepspeed.utils.groups._WORLD_GROUP``), so
    a group destroyed and made again breaks the next engine ("Group ... is not registered")."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tokenized-corpus cache for the whole session (the smoke corpus tokenizes once)."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """In-process Ray with 2 CPUs, as a laptop user gets it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 backed by SQLite; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no huey job workers: 2 cores
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=120, proc=proc)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (the test credentials are in the environment); yields its endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
