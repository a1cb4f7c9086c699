"""One trial: the Tune function that builds the job's TorchTrainer for its grid point and fits it, and
the one line that says why a trial failed."""

from __future__ import annotations

import os
import re
from typing import Any

import ray.tune
from ray.train.v2.api.result import Result
from ray.tune.integration.ray_train import TuneReportCallback

from rmt_dist.storage import Storage, redact
from rmt_dist.sweep import mlflow_runs
from rmt_dist.sweep.cleanup import TrialRecorder
from rmt_dist.sweep.layout import sweep_storage
from rmt_dist.sweep.space import trial_config
from rmt_dist.tracking import finish_run
from rmt_dist.train import metrics as M
from rmt_dist.train.driver import build_trainer, prepare_data

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")
_RAY_WRAPPERS = ("ray.train.WorkerGroupError", "ray.train.ControllerError", "ray.exceptions.RayTaskError",
                 "ray.exceptions.RayActorError", "ray.exceptions.ActorDiedError", "TrainingFailedError")


def train_run_name(trial_id: str) -> str:
    """The trial's Train run (and its directory under the sweep's storage)."""
    return f"train_{trial_id}"


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function of one trial: build the job's TorchTrainer for this grid point and fit it."""
    sweep = config["sweep"]
    os.environ.update(sweep.get("env") or {})  # before build_trainer reads the forwarded names
    trial_id = ray.tune.get_context().get_trial_id()
    point = config["train_loop_config"].get("point") or {}
    cfg = prepare_data(trial_config(sweep["base"], config["train_loop_config"]))
    run_id = mlflow_runs.open_child(cfg, sweep, trial_id, point) if cfg.mlflow.enabled else None
    storage = sweep_storage(cfg.storage, sweep["name"])
    finished = _finished_train_metrics(storage, train_run_name(trial_id), cfg.train.max_steps)
    if finished is not None:
        # Interrupted after its Train run ended but before Tune saw the trial end: nothing to train; give
        # Tune the run's final report (it restarted this trial with an empty result history).
        ray.tune.report(finished)
        if run_id:
            finish_run(cfg, run_id, "FINISHED", {"trial_id": trial_id, **finished})
        return
    trainer = build_trainer(cfg, storage, train_run_name(trial_id), {"mlflow_run_id": run_id},
                            callbacks=[TuneReportCallback(), TrialRecorder(sweep["name"], trial_id)])
    try:
        result = trainer.fit()
    except BaseException as err:
        # A trial the scheduler stopped was tagged stopped early by the driver before it aborted the
        # trial's Train controller (which is what raised here): the driver closes that run.
        if run_id:
            mlflow_runs.close_failed(cfg, run_id, error_line(str(err)))
        raise
    if run_id:
        finish_run(cfg, run_id, "FINISHED", {"trial_id": trial_id, **dict(result.metrics or {})})


def _finished_train_metrics(storage: Storage, name: str, max_steps: int) -> dict[str, Any] | None:
    """The last report of the Train run ``name`` if it already reached ``max_steps``, else None."""
    try:
        metrics = Result.from_path(f"{storage.ray_path}/{name}", storage_filesystem=storage.filesystem).metrics
    except Exception:  # no such run yet (the usual case)
        return None
    return dict(metrics) if metrics and metrics.get(M.STEP, 0) >= max_steps else None


def _cause(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "worker process has died" in ln:
            kind = re.search(r"Worker exit type: (\w+)", ln)
            detail = re.search(r"Worker exit detail: (.*?\.)(\s|$)", ln)
            return "worker process died" + (f" ({kind.group(1)}" if kind else "") + (
                f": {detail.group(1)}" if detail else "") + (")" if kind else "")
    exceptions = [ln for ln in lines if _EXCEPTION_LINE.match(ln) and not ln.startswith(_RAY_WRAPPERS)]
    if exceptions:
        return exceptions[-1]
    wrapped = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (wrapped or lines or [""])[-1]


def error_line(text: str) -> str:
    """One line for why a trial failed: the failing rank and its exception (``rank 0: torch.OutOfMemoryError:
    ...``) or how its worker died, else the last exception line; redacted, at most 400 characters."""
    text = str(text)
    snippet = re.search(r"\[Rank (\d+) Error Snippet\]:(.*?)(?=\[Rank \d+ Error Snippet\]|\Z)", text, re.S)
    line = f"rank {snippet.group(1)}: {_cause(snippet.group(2))}" if snippet else _cause(text)
    return redact(" ".join(line.split()))[:400]
