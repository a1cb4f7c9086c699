"""The driver side of a training run: checks, Ray, the TorchTrainer, a live progress line, MLflow.

``python jobs/X.py`` starts Ray in-process; under ``ray job submit`` (``RAY_ADDRESS`` set) it joins
the cluster. Everything that can be wrong with the input is checked here, before any worker starts.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from rmt_dist.config import Config, ConfigError, apply_overrides, to_flat
from rmt_dist.storage import Storage, check_writable, first_line, redact, resolve
from rmt_dist.train import faults, metrics as M
from rmt_dist.train.worker import train_loop_per_worker
from rmt_dist.train.workloads import workload_class
from rmt_dist.workload_kinds import dataset_kind


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Rank 0 posts each step's metrics here; the driver polls the latest for the progress line."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def update(self, report: dict[str, Any]) -> None:
        self.latest = report

    def get(self) -> dict[str, Any] | None:
        return self.latest


@dataclass
class RunSummary:
    metrics: dict[str, Any]
    checkpoint: str | None
    mlflow_run_id: str | None
    run_name: str
    storage: str


def resolve_locations(cfg: Config) -> Config:
    """Workers (and sweep trials) run in other working directories: make the driver's relative local
    paths and its SQLite tracking URI absolute (the default ``sqlite:///mlflow.db`` included)."""
    from rmt_dist.tracking import tracking_uri

    changes: dict[str, Any] = {}
    for key, value in (("storage.path", cfg.storage.path), ("data.path", cfg.data.path),
                       ("data.cache_dir", cfg.data.cache_dir), ("storage.export_path", cfg.storage.export_path)):
        if value and "://" not in value:
            changes[key] = str(Path(value).expanduser().resolve())
    if cfg.model.hf_name_or_path and Path(cfg.model.hf_name_or_path).expanduser().exists():  # else a hub name
        changes["model.hf_name_or_path"] = str(Path(cfg.model.hf_name_or_path).expanduser().resolve())
    if cfg.mlflow.enabled:
        changes["mlflow.tracking_uri"] = tracking_uri(cfg)
    return apply_overrides(cfg, changes)


def prepare_data(cfg: Config) -> Config:
    """Tokenize/generate the data once on the driver (workers then hit the cache); fill in vocab_size.

    Raises ConfigError / DataError (one line) for missing files, empty corpora, bad sizes.
    """
    model_vocab = _check_hf_model(cfg) if cfg.model.backbone == "hf" else None
    vocab = workload_class(cfg).prepare(cfg)
    if model_vocab is not None and vocab > model_vocab:
        raise ConfigError(f"model.hf_name_or_path must have a vocabulary of at least its tokenizer's {vocab} ids, "
                          f"got {model_vocab}")
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size must be >= the data's vocabulary ({vocab}), got {cfg.model.vocab_size}")
    return apply_overrides(cfg, {"model.vocab_size": cfg.model.vocab_size or vocab})


def _check_hf_model(cfg: Config) -> int | None:
    """The pretrained model must load and fit the workload (a causal LM for text, an encoder for
    classification); returns a causal LM's vocabulary size."""
    from transformers import AutoConfig

    from rmt_dist.model.hf import is_causal_lm

    path = cfg.model.hf_name_or_path
    try:
        causal = is_causal_lm(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.hf_name_or_path must be a Hugging Face model (a hub name or a directory with "
                          f"config.json), got {path!r} ({first_line(err)})") from None
    wants_encoder = dataset_kind(cfg.data.dataset).workload == "classify"
    if wants_encoder and causal:
        raise ConfigError(f"model.hf_name_or_path must be an encoder (BERT, RoBERTa, DeBERTa) for "
                          f"data.dataset=classify, got the causal LM {path!r}")
    if not wants_encoder and not causal:
        raise ConfigError(f"model.hf_name_or_path must be a causal LM for data.dataset={cfg.data.dataset}, got the "
                          f"encoder {path!r} (encoders: data.dataset=classify)")
    return AutoConfig.from_pretrained(path).vocab_size if causal else None


def init_ray(cfg: Config, num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray with ``num_cpus`` logical CPUs
    (default: enough for the run's workers, at least the machine's cores)."""
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if (os.environ.get("RAY_ADDRESS") or "local") != "local":
        ray.init(**quiet)
    else:
        cpus = num_cpus or max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)  # never another session's
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_trainer(cfg: Config, storage: Storage, run_name: str, loop_config: dict[str, Any],
                  callbacks: list[Any] | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; ``callbacks`` go to Train's RunConfig (a sweep passes Tune's
    TuneReportCallback so that every report reaches the trial)."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_flat(cfg), **loop_config},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                     placement_strategy=cfg.scaling.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage.ray_path, storage_filesystem=storage.filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.num_to_keep,
                                               checkpoint_score_attribute=M.STEP, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
            callbacks=callbacks,
        ),
    )


# Environment variables that workers (and sweep trials) get from the driver: names of non-secrets only.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", faults.FAULT_ENV)


def _worker_env(cfg: Config) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(cfg.scaling.cpus_per_worker), "TOKENIZERS_PARALLELISM": "false"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for name in FORWARDED_ENV:
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def _progress_line(report: dict[str, Any], total: int, started: float) -> str:
    step = report[M.STEP]
    eta = (time.time() - started) / max(step, 1) * (total - step)
    parts = [f"step {step}/{total}", f"loss {report[M.TRAIN_LOSS]:.3f}"]
    for key in (M.VAL_PPL, M.VAL_BPC, M.VAL_ACC, M.VAL_F1):
        if key in report:
            parts.append(f"{key} {report[key]:.3f}")
    if M.TOKENS_PER_S in report:
        parts.append(f"{report[M.TOKENS_PER_S]:,.0f} tok/s")
    parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
    return " | ".join(parts)


def _fit_with_progress(trainer: TorchTrainer, board: Any, total: int) -> Any:
    result: dict[str, Any] = {}

    def fit() -> None:
        try:
            result["value"] = trainer.fit()
        except BaseException as err:  # re-raised in the main thread
            result["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    started, shown, last_print = time.time(), None, 0.0
    thread.start()
    tty = sys.stdout.isatty()
    while thread.is_alive():
        thread.join(timeout=1.0)
        report = ray.get(board.get.remote())
        if report and report != shown:
            line = _progress_line(report, total, started)
            if tty:
                print("\r" + line.ljust(100), end="", flush=True)
            elif time.time() - last_print > 10 or report[M.STEP] == total:
                print(line, flush=True)
                last_print = time.time()
            shown = report
    if tty and shown:
        print()
    if "error" in result:
        raise result["error"]
    return result["value"]


def run_training(cfg: Config, job: str, run_name: str | None = None, parent_run_id: str | None = None) -> RunSummary:
    """Check input, run the TorchTrainer, track it in MLflow; returns the final metrics and locations."""
    cfg = resolve_locations(cfg)
    storage = resolve(cfg.storage)
    check_writable(storage)
    cfg = prepare_data(cfg)
    run_name = run_name or cfg.storage.run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(cfg)

    run_id = None
    if cfg.mlflow.enabled:
        from rmt_dist.tracking import open_run

        run_id = open_run(cfg, job, run_name, parent_run_id)
    board = ProgressBoard.remote()
    trainer = build_trainer(cfg, storage, run_name, {"mlflow_run_id": run_id, "progress": board})
    try:
        result = _fit_with_progress(trainer, board, cfg.train.max_steps)
    except BaseException:
        if run_id:
            from rmt_dist.tracking import finish_run

            finish_run(cfg, run_id, "FAILED", {"storage": storage.uri, "run_name": run_name})
        raise
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = result.checkpoint.path if storage.filesystem is None else f"s3://{result.checkpoint.path}"
        if cfg.storage.export_path:
            from rmt_dist.train.export import export_checkpoint

            with result.checkpoint.as_directory() as directory:
                export_checkpoint(cfg, Path(directory), cfg.storage.export_path)
    summary = RunSummary(metrics=dict(result.metrics or {}), checkpoint=checkpoint, mlflow_run_id=run_id,
                         run_name=run_name, storage=storage.uri)
    if run_id:
        from rmt_dist.tracking import finish_run

        finish_run(cfg, run_id, "FINISHED", {"checkpoint": checkpoint, "storage": storage.uri, "run_name": run_name,
                                             **summary.metrics})
    return summary


def summary_line(summary: RunSummary) -> str:
    shown = [f"{k}={summary.metrics[k]:.4g}" for k in (M.VAL_LOSS, M.VAL_PPL, M.VAL_BPC, M.VAL_ACC, M.VAL_F1)
             if k in summary.metrics]
    return (f"done: {' '.join(shown) or 'no validation metrics'} | checkpoint: {redact(str(summary.checkpoint))} | "
            f"mlflow run: {summary.mlflow_run_id}")
