"""Running a sweep: Ray and its concurrency, the Tuner (new or restored), and the results table."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from rmt_dist import report as R
from rmt_dist.config import ConfigError, from_flat, to_flat
from rmt_dist.storage import Storage
from rmt_dist.sweep import mlflow_runs
from rmt_dist.sweep.callback import SweepCallback
from rmt_dist.sweep.cleanup import start_registry
from rmt_dist.sweep.layout import TUNE_DIR, read_ended, read_state, save_report, sweep_storage, write_state
from rmt_dist.sweep.space import Dim, trial_config
from rmt_dist.sweep.spec import SweepSpec
from rmt_dist.sweep.trial import error_line, run_trial
from rmt_dist.train.driver import init_ray

TRIAL_CPU = 1  # what a trial's driver (the Tune function) reserves besides its Train workers

# Ray Tune copies these from the driver's environment into every trial's runtime_env, and Ray's
# runtime-env agent logs runtime envs in full: the secret would land in Ray's log files.
_TUNE_PROPAGATED_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@dataclass
class SweepOutcome:
    spec: SweepSpec
    records: list[R.TrialRecord]
    interrupted: bool
    parent_run_id: str | None
    report_dir: str | None
    resumed: bool


def _init_ray(spec: SweepSpec, per_trial_cpus: int) -> None:
    """The driver's Ray start-up; a local Ray gets a logical CPU per concurrent trial's driver too (each
    trial's driver waits while its workers compute)."""
    cores = os.cpu_count() or 1
    base = from_flat(spec.base)
    want = spec.max_concurrent or max(1, cores // (base.scaling.num_workers * base.scaling.cpus_per_worker))
    init_ray(base, num_cpus=max(cores, min(want, spec.num_trials) * per_trial_cpus))


def _per_trial(spec: SweepSpec) -> tuple[int, int]:
    """CPUs and GPUs one trial holds at most: its Train workers plus its driver's CPU."""
    cpus, gpus = 0, 0
    for point in spec.points:
        s = trial_config(spec.base, {"point": point}).scaling
        cpus = max(cpus, s.num_workers * s.cpus_per_worker + TRIAL_CPU)
        gpus = max(gpus, s.num_workers if s.use_gpu else 0)
    return cpus, gpus


def concurrency(spec: SweepSpec, resources: Mapping[str, float], cpus: int, gpus: int) -> int:
    """--max-concurrent, else as many trials as the cluster's CPUs (and GPUs) hold at once (at least 1).

    Tune sees only a trial's driver CPU; its workers are placed later by Train, so without this cap
    Tune would start trials whose workers then wait for each other's resources."""
    if spec.max_concurrent:
        return spec.max_concurrent
    fits = int(resources.get("CPU", 0) // cpus)
    if gpus:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
    return max(1, min(fits, spec.num_trials))


def _domain(d: Dim) -> tune.search.sample.Domain:
    """A random key's Tune distribution."""
    if d.kind == "choice":
        return tune.choice(list(d.values))
    if d.kind == "uniform":
        return tune.uniform(d.low, d.high)
    if d.kind == "loguniform":
        return tune.loguniform(d.low, d.high)
    if d.kind == "randint":
        return tune.randint(int(d.low), int(d.high) + 1)  # inclusive of HIGH
    raise ValueError(d.kind)


def param_space(spec: SweepSpec, parent_run_id: str | None) -> dict[str, Any]:
    loop: dict[str, Any] = {"point": tune.grid_search(spec.points)}
    loop.update({d.key: _domain(d) for d in spec.random})
    return {"train_loop_config": loop,
            "sweep": {"name": spec.name, "job": spec.job, "base": spec.base, "parent_run_id": parent_run_id,
                      "searched": spec.searched_keys, "env": spec.forward_env}}


def records_from_results(grid: tune.ResultGrid, spec: SweepSpec, ended: Mapping[str, str]) -> list[R.TrialRecord]:
    """One record per Tune trial, from the ResultGrid (its reported rows, error, config); its status from
    ``ended`` (what the sweep's callback saw end), ``running`` if it did not end."""
    records = []
    for result in grid:
        config = result.config or {}
        loop = config.get("train_loop_config", {})
        point = loop.get("point") or {}
        try:
            cfg = trial_config(spec.base, loop)
        except ConfigError:
            cfg = from_flat(spec.base)
        df = result.metrics_dataframe
        rows = df.to_dict("records") if df is not None and len(df) else []
        figures = R.summarise(rows, spec.metric, spec.mode)
        trial_id = str((result.metrics or {}).get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"))
        status = ended.get(trial_id, "running")
        flat = to_flat(cfg)
        records.append(R.TrialRecord(
            trial_id=str(trial_id), kind=cfg.memory.kind, num_tokens=cfg.memory.num_tokens, xl_len=cfg.memory.xl_len,
            bptt_unroll=cfg.memory.bptt_unroll, status=status, metric=spec.metric,
            swept={k: flat[k] for k in spec.searched_keys}, paper_row=point.get("paper_row"),
            paper_value=point.get("paper_value"), error=error_line(str(result.error)) if result.error else "",
            **figures))
    return records


@contextlib.contextmanager
def _credentials_hidden_from_tune() -> Iterator[None]:
    """Keep AWS credentials out of Tune's trial runtime_env (and so out of Ray's logs). A local Ray
    was started from this process and its workers inherited them already; cluster nodes use their
    own (instance profile, Kubernetes secrets)."""
    saved = {k: os.environ.pop(k) for k in _TUNE_PROPAGATED_CREDENTIALS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _trial_dirname(trial: tune.experiment.Trial) -> str:
    return f"trial_{trial.trial_id}"


def _new_tuner(spec: SweepSpec, trainable: Any, parent_run_id: str | None, limit: int,
               storage: Storage) -> tune.Tuner:
    scheduler = None
    if spec.scheduler == "asha":
        base = from_flat(spec.base)
        evals = math.ceil(base.train.max_steps / base.train.eval_interval)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(evals, spec.asha_grace),
                                  grace_period=spec.asha_grace, reduction_factor=spec.asha_reduction,
                                  stop_last_trials=False)
    return tune.Tuner(
        trainable, param_space=param_space(spec, parent_run_id),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    num_samples=spec.num_samples, max_concurrent_trials=limit,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage.ray_path, storage_filesystem=storage.filesystem,
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  callbacks=[SweepCallback(spec)]))


def run_sweep(spec: SweepSpec) -> SweepOutcome:
    """Run (or resume) the sweep; write its table and plots; close its MLflow parent run."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our own lines say where to look
    cfg = from_flat(spec.base)
    storage = sweep_storage(cfg.storage, spec.name)
    saved = read_state(storage)
    if saved and saved["identity"] != json.loads(json.dumps(spec.identity(), default=str)):
        raise ConfigError(f"--name {spec.name}: a sweep of that name in {storage.uri} has a different search space or "
                          "config; rerun its own command to resume it, or pick another --name")
    parent_run_id = mlflow_runs.open_parent(spec, saved)
    if not saved:
        write_state(storage, {"identity": spec.identity(), "parent_run_id": parent_run_id, "name": spec.name})

    cpus, gpus = _per_trial(spec)
    _init_ray(spec, cpus)
    limit = concurrency(spec, ray.cluster_resources(), cpus, gpus)
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    tune_path = f"{storage.ray_path}/{TUNE_DIR}"
    restorable = tune.Tuner.can_restore(tune_path, storage_filesystem=storage.filesystem)
    print(f"sweep {spec.name}: {spec.num_trials} trials of {spec.job} "
          f"({'resuming' if restorable else 'new'}; {limit} at a time, {cpus} CPUs"
          f"{f' + {gpus} GPUs' if gpus else ''} each; judged by {spec.metric})"
          + (f"; {spec.dropped} grid points were the baseline again and run once" if spec.dropped else ""), flush=True)
    if restorable:
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, storage_filesystem=storage.filesystem)
    else:
        tuner = _new_tuner(spec, trainable, parent_run_id, limit, storage)
    registry = start_registry(spec.name)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0: no Tune tables; our callback prints one line per event
    # A failed trial is one line from our callback (and its error.txt), not Tune's traceback on stderr.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with _credentials_hidden_from_tune():
            grid = tuner.fit()
    finally:
        ray.kill(registry)
    ended = read_ended(storage)
    records = records_from_results(grid, spec, ended)
    # Trials Tune had not generated yet are missing from the grid (it generates them as slots free up).
    interrupted = len(records) < spec.num_trials or any(r.status == "running" for r in records)
    if interrupted:
        if parent_run_id:
            mlflow_runs.kill_parent(cfg, parent_run_id)
        return SweepOutcome(spec, records, True, parent_run_id, None, bool(restorable))
    if parent_run_id:
        # The table from MLflow is the one `rmt_dist.report` prints.
        records = mlflow_runs.records_of_parent(cfg, parent_run_id, records, ended)
    title = f"sweep {spec.name} ({spec.job}" + (f", grid {spec.grid}" if spec.grid else "") + ")"
    with tempfile.TemporaryDirectory(prefix="rmt_sweep_") as tmp:
        files = R.write_report(records, spec.mode, tmp, title)
        report_dir = save_report(storage, files)
        if parent_run_id:
            mlflow_runs.finish_parent(spec, records, parent_run_id, files)
    return SweepOutcome(spec, records, False, parent_run_id, report_dir, bool(restorable))
