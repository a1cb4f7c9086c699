"""The Tune callback on the sweep's driver: one progress line per trial event, the trials that ended,
and the MLflow runs and worker reservations of trials that Tune stopped or lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ray.tune import Callback
from ray.tune.experiment import Trial

from rmt_dist.config import Config, ConfigError, from_flat
from rmt_dist.sweep import mlflow_runs
from rmt_dist.sweep.cleanup import release_trial
from rmt_dist.sweep.layout import mark_ended, sweep_storage
from rmt_dist.sweep.space import describe_point, trial_config
from rmt_dist.sweep.spec import SweepSpec
from rmt_dist.sweep.trial import error_line
from rmt_dist.train import metrics as M


class SweepCallback(Callback):
    """On the sweep's driver: one progress line per trial event; closes the MLflow run of a trial
    that Tune stopped (ASHA) or lost (its driver died) before it could close it itself."""

    def __init__(self, spec: SweepSpec) -> None:
        self.name, self.base, self.metric = spec.name, spec.base, spec.metric
        self.searched, self.total = spec.searched_keys, spec.num_trials
        self.stopping: set[str] = set()  # trials this callback stopped (their Train runs aborted)

    def _ended(self, trial: Trial, status: str) -> None:
        mark_ended(sweep_storage(from_flat(self.base).storage, self.name), trial.trial_id, status)

    def _cfg(self, trial: Trial) -> Config | None:
        try:
            return trial_config(self.base, trial.config["train_loop_config"])
        except ConfigError:
            return None

    def _say(self, trials: Sequence[Trial], trial: Trial, text: str, ended: bool = False) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") or (ended and t is trial) for t in trials)
        cfg = self._cfg(trial)
        row = (trial.config["train_loop_config"].get("point") or {}).get("paper_row")
        what = f"[{row}]" if row else describe_point(cfg, self.searched) if cfg else ""
        print(f"[sweep {done}/{self.total}] trial {trial.trial_id} {what}: {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._say(trials, trial, "started")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        cfg = self._cfg(trial)
        if cfg and self.metric in result:
            self._say(trials, trial, f"step {result.get(M.STEP)}/{cfg.train.max_steps} "
                                     f"{self.metric} {result[self.metric]:.4g}")
        if result.get("done") and cfg and result.get(M.STEP, 0) < cfg.train.max_steps:
            # Tune sets done on the result it is about to stop the trial on (the scheduler's STOP), and
            # only then stops the trial. Stop its Train run now, before its workers train (and log) on.
            self.stopping.add(trial.trial_id)
            run = mlflow_runs.find_child(cfg, self.name, trial.trial_id) if cfg.mlflow.enabled else None
            if run is not None:  # tagged before the abort makes the trial's fit() raise (see run_trial)
                mlflow_runs.tag_stopped(cfg, run.info.run_id)
            release_trial(self.name, trial.trial_id, abort=True)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        cfg = self._cfg(trial)
        step = (trial.last_result or {}).get(M.STEP, 0)
        stopped = trial.trial_id in self.stopping
        release_trial(self.name, trial.trial_id, abort=False)  # anything left of a stopped trial
        run = mlflow_runs.find_child(cfg, self.name, trial.trial_id) if cfg and cfg.mlflow.enabled else None
        if run is not None and run.info.status == "RUNNING":
            mlflow_runs.close_run(cfg, run.info.run_id, "FINISHED", stopped=stopped)
        self._ended(trial, "stopped" if stopped else "done")
        self._say(trials, trial, f"stopped early by ASHA after step {step}" if stopped else "done", ended=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local and local.exists() else (trial.get_error() or "")
        line = error_line(text) or "failed"
        cfg = self._cfg(trial) or from_flat(self.base)
        if cfg.mlflow.enabled:
            run = mlflow_runs.find_child(cfg, self.name, trial.trial_id)
            if run is not None and run.info.status == "RUNNING":
                mlflow_runs.close_run(cfg, run.info.run_id, "FAILED", error=line)
        release_trial(self.name, trial.trial_id, abort=True)
        self._ended(trial, "failed")
        where = f" (details: {trial.path}/error.txt)" if trial.path else ""
        self._say(trials, trial, f"FAILED: {line}{where}", ended=True)
