"""The sweep's MLflow runs: one parent per sweep (search space, best trial, table and plots) and one
nested child per trial (its config, metrics, and how it ended)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow

from rmt_dist import report as R
from rmt_dist.config import Config, from_flat
from rmt_dist.sweep.space import MEMORY_KEYS, describe_point
from rmt_dist.sweep.spec import SweepSpec
from rmt_dist.tracking import BEST_CONFIG_TAG, BEST_RUN_ID_TAG, BEST_TRIAL_TAG, ERROR_TAG, GRID_TAG, METRIC_TAG, \
    MODE_TAG, PAPER_ROW_TAG, PAPER_VALUE_TAG, POINT_TAG, ROLE_TAG, RUN_NAME_TAG, SEARCH_PARAM_PREFIX, STOPPED_TAG, \
    SWEEP_TAG, TRIAL_TAG, finish_run, open_run, tracking_uri


def client(cfg: Config) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))


def child_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}/{trial_id}"


# --------------------------------------------------------------------------------------- the trials

def open_child(cfg: Config, sweep: Mapping[str, Any], trial_id: str, point: Mapping[str, Any]) -> str:
    """A trial's run, nested under the sweep's parent (or the same run again when the trial resumes)."""
    tags = {SWEEP_TAG: sweep["name"], ROLE_TAG: "trial", TRIAL_TAG: trial_id,
            POINT_TAG: describe_point(cfg, sweep.get("searched", []))}
    if point.get("paper_row"):
        tags.update({PAPER_ROW_TAG: point["paper_row"], PAPER_VALUE_TAG: str(point["paper_value"])})
    return open_run(cfg, sweep["job"], child_run_name(sweep["name"], trial_id), sweep.get("parent_run_id"), tags=tags)


def find_child(cfg: Config, sweep_name: str, trial_id: str) -> mlflow.entities.Run | None:
    """The run of trial ``trial_id``, or None."""
    mlflow_client = client(cfg)
    exp = mlflow_client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    runs = mlflow_client.search_runs([exp.experiment_id], max_results=1, filter_string=(
        f"tags.`{RUN_NAME_TAG}` = '{child_run_name(sweep_name, trial_id)}'"))
    return runs[0] if runs else None


def close_run(cfg: Config, run_id: str, status: str, error: str = "", stopped: bool = False) -> None:
    mlflow_client = client(cfg)
    if error:
        mlflow_client.set_tag(run_id, ERROR_TAG, error)
    if stopped:
        mlflow_client.set_tag(run_id, STOPPED_TAG, "true")
    finish_run(cfg, run_id, status, {"error": error} if error else {"stopped_early": stopped})


def close_failed(cfg: Config, run_id: str, error: str) -> None:
    """Close a trial's run as FAILED, unless the driver tagged it stopped early (it closes that one)."""
    run = client(cfg).get_run(run_id)
    if run.info.status == "RUNNING" and run.data.tags.get(STOPPED_TAG) != "true":
        close_run(cfg, run_id, "FAILED", error=error)


def tag_stopped(cfg: Config, run_id: str) -> None:
    client(cfg).set_tag(run_id, STOPPED_TAG, "true")


# --------------------------------------------------------------------------------------- the parent

def _parent_params(spec: SweepSpec) -> dict[str, Any]:
    searched = set(spec.searched_keys)
    params = {k: v for k, v in spec.base.items() if k not in searched}
    for key in spec.grid_keys:
        values = sorted((json.loads(v) for v in {json.dumps(p["overrides"].get(key, spec.base[key]))
                                                 for p in spec.points}), key=lambda v: (type(v).__name__, v))
        params[f"{SEARCH_PARAM_PREFIX}{key}"] = ",".join(str(v) for v in values)[:6000]
    for d in spec.random:
        params[f"{SEARCH_PARAM_PREFIX}{d.key}"] = d.describe()
    params.update({"sweep.grid": spec.grid or "", "sweep.num_trials": spec.num_trials,
                   "sweep.num_samples": spec.num_samples, "sweep.scheduler": spec.scheduler})
    return params


def open_parent(spec: SweepSpec, saved: Mapping[str, Any] | None) -> str | None:
    """The sweep's parent run: reopened when ``saved`` (the sweep's saved state) names one, else new."""
    cfg = from_flat(spec.base)
    if not cfg.mlflow.enabled:
        return None
    if saved and saved.get("parent_run_id"):
        client(cfg).update_run(saved["parent_run_id"], status="RUNNING")
        return saved["parent_run_id"]
    run_id = open_run(cfg, spec.job, spec.name, params=_parent_params(spec), tags={
        SWEEP_TAG: spec.name, ROLE_TAG: "parent", METRIC_TAG: spec.metric, MODE_TAG: spec.mode,
        GRID_TAG: spec.grid or ""})
    client(cfg).log_text(run_id, json.dumps({"grid": spec.grid, "points": spec.points,
                                             "random": [dataclasses.asdict(d) for d in spec.random],
                                             "num_samples": spec.num_samples, "scheduler": spec.scheduler,
                                             "metric": spec.metric, "mode": spec.mode}, indent=1, default=str),
                         "search_space.json")
    return run_id


def records_of_parent(cfg: Config, parent_run_id: str, like: Sequence[R.TrialRecord],
                      ended: Mapping[str, str]) -> list[R.TrialRecord]:
    """The trials' records as MLflow holds them (every trial's whole history, also across resumes: Tune
    restarts an interrupted trial with an empty result history) when MLflow has exactly the trials of
    ``like``, with their status from ``ended``; else ``like``."""
    mlflow_client = client(cfg)
    from_mlflow, _, _ = R.records_from_mlflow(mlflow_client, mlflow_client.get_run(parent_run_id))
    if sorted(r.trial_id for r in from_mlflow) != sorted(r.trial_id for r in like):
        return list(like)
    for r in from_mlflow:
        r.status = ended.get(r.trial_id, r.status)
    return from_mlflow


def kill_parent(cfg: Config, parent_run_id: str) -> None:
    client(cfg).set_terminated(parent_run_id, status="KILLED")


def finish_parent(spec: SweepSpec, records: Sequence[R.TrialRecord], parent_run_id: str,
                  files: Sequence[Path]) -> None:
    """The table and plots as artifacts, the best trial as tags, metric and ``best_trial.json``; closed."""
    cfg = from_flat(spec.base)
    mlflow_client = client(cfg)
    for f in files:
        mlflow_client.log_artifact(parent_run_id, str(f))
    ranked = [r for r in R.sort_records(records, spec.mode) if r.best is not None]
    summary: dict[str, Any] = {"trials": len(records), **{s: sum(r.status == s for r in records) for s in R.STATUSES}}
    if ranked:
        best = ranked[0]
        child = find_child(cfg, spec.name, best.trial_id)
        mlflow_client.set_tag(parent_run_id, BEST_TRIAL_TAG, best.trial_id)
        mlflow_client.set_tag(parent_run_id, BEST_CONFIG_TAG, " ".join([f"{best.kind} {best.label}", *(
            f"{k}={v}" for k, v in best.swept.items() if k not in MEMORY_KEYS)]))
        if child is not None:
            mlflow_client.set_tag(parent_run_id, BEST_RUN_ID_TAG, child.info.run_id)
        mlflow_client.log_metric(parent_run_id, f"best_{spec.metric}", best.best)
        best_trial = best.swept | {"trial_id": best.trial_id, spec.metric: best.best}
        mlflow_client.log_text(parent_run_id, json.dumps(best_trial, indent=1, default=str), "best_trial.json")
        summary.update({"best_trial": best.trial_id, f"best_{spec.metric}": best.best})
    finish_run(cfg, parent_run_id, "FINISHED", summary)
