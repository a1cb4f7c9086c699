"""What Ray Train runs on every worker: ``train_loop_per_worker`` builds the loop's context and reporter
from Ray's and calls ``loop.run``.

:class:`RayReporter` is the worker's one exit for metrics: every step goes to MLflow (rank 0's
``tracking.MetricLogger``) and to the driver's progress board (rank 0); an evaluation, with its
checkpoint, also goes to ``ray.train.report`` (every rank: a collective), which the run's result, its
checkpoints and Tune's trials read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from rmt_dist.config import Config, from_flat
from rmt_dist.train import faults, metrics as M
from rmt_dist.train.loop import WorkerContext, run


class RayReporter:
    def __init__(self, cfg: Config, rank: int, mlflow_run_id: str | None, progress: Any | None) -> None:
        self.rank = rank
        self.logger = None
        if rank == 0 and mlflow_run_id:
            from rmt_dist.tracking import MetricLogger

            self.logger = MetricLogger(cfg, mlflow_run_id)
        self.progress = progress if rank == 0 else None  # the driver's ProgressBoard actor

    def report(self, metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        step = int(metrics[M.STEP])
        faults.exit_if_due(step, self.rank)
        if checkpoint is not None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)))
        if self.logger:
            self.logger.log({k: v for k, v in metrics.items() if k != M.STEP}, step)
            if checkpoint is not None:
                self.logger.flush()
        if self.progress is not None:
            self.progress.update.remote(metrics)

    def close(self) -> None:
        if self.logger:
            self.logger.close()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """``loop_config``: ``config`` (the flat Config), ``mlflow_run_id`` and ``progress`` (both optional)."""
    cfg = from_flat(loop_config["config"])
    context = ray.train.get_context()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    device = torch.device("cuda", context.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    resume = ray.train.get_checkpoint()
    ctx = WorkerContext(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=device,
        resume=None if resume is None else lambda directory: Path(resume.to_directory(str(directory))),
        node_id=ray.get_runtime_context().get_node_id())
    run(cfg, ctx, RayReporter(cfg, ctx.rank, loop_config.get("mlflow_run_id"), loop_config.get("progress")))
