"""MLflow: the driver opens (or reopens) a run and logs params/tags/artifacts; rank 0 logs metrics.

Metric names are shared by MLflow, Tune and the CLI summary (DESIGN.md); they live in
``rmt_dist.train.metrics``. Params are the flat config, passed through :func:`storage.redact`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping

from rmt_dist.config import Config, to_flat
from rmt_dist.storage import endpoint_url, redact

# Names this project gives MLflow tags and params: written by the driver and the sweep, read by the
# report (``rmt_dist.report``) and by resumes.
RUN_NAME_TAG = "rmt_dist.run_name"  # the run's name, by which a rerun finds the run to resume
SWEEP_TAG = "rmt_dist.sweep"  # the sweep's name, on the parent and on every trial's run
ROLE_TAG = "rmt_dist.sweep_role"  # "parent" or "trial"
TRIAL_TAG = "rmt_dist.trial_id"
POINT_TAG = "rmt_dist.point"  # on a trial: its memory configuration and other searched keys, in words
GRID_TAG = "rmt_dist.grid"  # on the parent: the paper grid swept, or empty
METRIC_TAG = "rmt_dist.metric"  # on the parent: the validation metric the sweep is judged by
MODE_TAG = "rmt_dist.mode"  # min or max
PAPER_ROW_TAG = "rmt_dist.paper_row"
PAPER_VALUE_TAG = "rmt_dist.paper_value"
STOPPED_TAG = "rmt_dist.stopped_early"  # "true" when the scheduler (ASHA) stopped the trial
ERROR_TAG = "rmt_dist.error"  # the one-line reason a trial failed
BEST_TRIAL_TAG = "rmt_dist.best_trial"  # on the parent, when the sweep ends: the best trial's id,
BEST_RUN_ID_TAG = "rmt_dist.best_run_id"  # its run id
BEST_CONFIG_TAG = "rmt_dist.best_config"  # and its searched values in words
SEARCH_PARAM_PREFIX = "search."  # the parent's params that describe the search space


def tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Relative SQLite paths are made absolute so Ray workers (other working directories) find the file.
    """
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _ray_job_id() -> str:
    """The submission id under `ray job submit`, else the driver's Ray job id, else empty."""
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        return os.environ["RAY_JOB_SUBMISSION_ID"]
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    except Exception:  # the tag is informative only
        return ""


def _use_s3_endpoint(cfg: Config) -> None:
    """MLflow reads a custom S3 endpoint for s3:// artifacts from MLFLOW_S3_ENDPOINT_URL."""
    endpoint = endpoint_url(cfg.storage)
    if endpoint:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)


def open_run(cfg: Config, job: str, run_name: str, parent_run_id: str | None = None, *,
             params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> str:
    """Create the run (or reopen the unfinished one of the same ``run_name``, for resumes); returns its id.

    ``params`` replaces the flat config as the run's params (a sweep's parent logs its search space);
    ``tags`` are added to the new run's tags.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    _use_s3_endpoint(cfg)
    experiment = cfg.mlflow.experiment or job
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        experiment, artifact_location=cfg.mlflow.artifact_location or None)
    client = mlflow.MlflowClient()
    previous = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if previous and previous[0].info.status != "FINISHED":
        client.update_run(previous[0].info.run_id, status="RUNNING")
        return previous[0].info.run_id
    run_tags = {RUN_NAME_TAG: run_name, "job": job, "git_commit": _git_commit(), "hostname": socket.gethostname(),
                "ray_job_id": _ray_job_id(), **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=run_tags)
    logged = {k: redact(str(v)) for k, v in (to_flat(cfg) if params is None else params).items()}
    items = list(logged.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    return run.info.run_id


def finish_run(cfg: Config, run_id: str, status: str, summary: Mapping[str, Any]) -> None:
    """Attach the resolved config and the run summary (final checkpoint path included), then close."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    _use_s3_endpoint(cfg)
    client = mlflow.MlflowClient()
    client.log_text(run_id, json.dumps({k: redact(str(v)) if isinstance(v, str) else v
                                        for k, v in to_flat(cfg).items()}, indent=1), "config.json")
    client.log_text(run_id, json.dumps({k: redact(str(v)) for k, v in summary.items()}, indent=1), "summary.json")
    if summary.get("checkpoint"):
        client.set_tag(run_id, "final_checkpoint", redact(str(summary["checkpoint"])))
    client.set_terminated(run_id, status=status)


class MetricLogger:
    """Rank 0's handle on the run: metrics with explicit steps, and MLflow system metrics."""

    def __init__(self, cfg: Config, run_id: str) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(cfg))
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        # Asynchronous: a per-step metric must not stall the training step on a database write.
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=False)

    def flush(self) -> None:
        """Wait until every metric logged so far is stored (called at each checkpoint)."""
        self._mlflow.flush_async_logging()

    def close(self) -> None:
        # Leave the run's status to the driver, which knows whether the whole job succeeded.
        self._mlflow.flush_async_logging()
        self._mlflow.end_run(status="RUNNING")
