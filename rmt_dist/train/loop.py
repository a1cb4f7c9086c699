"""The training loop, one for every workload (LM streams, tasks, classification), run by every rank.

    run(cfg, ctx, reporter): build the workload, model and DeepSpeed engine -> resume from ``ctx.resume``
    -> per step: forward/backward per BPTT mode, ``engine.step()``, report ``train_loss`` -> every
    ``train.eval_interval`` steps and at the last: evaluate with memory carried over the validation
    stream, save DeepSpeed's shards + this rank's trainer state, report the metrics with the checkpoint.

No Ray here: ``train/worker.py`` is Ray Train's adapter (its context, and a Reporter that feeds
``ray.train.report``, MLflow and the driver's progress line); ``tests/test_loop.py`` runs ``run`` in
one process with a recording reporter. ``checkpoint.save`` and a report with a checkpoint are
collectives: every rank makes them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from rmt_dist.config import Config
from rmt_dist.model import build_model
from rmt_dist.train import checkpoint, metrics as M
from rmt_dist.train import flops
from rmt_dist.train.engine import build_engine, check_step_complete, micro_step, model_dtype, model_loading
from rmt_dist.train.workloads import LMWorkload, TaskWorkload, make_workload

Workload = LMWorkload | TaskWorkload


@dataclass(frozen=True)
class WorkerContext:
    """Where this worker stands in the run."""

    rank: int
    world_size: int
    device: torch.device
    # Fetches the checkpoint to resume from into the directory it is given and returns where it lies
    # (None: a fresh start).
    resume: Callable[[Path], Path] | None = None
    node_id: str = ""  # the machine, recorded in checkpoint manifests


class Reporter(Protocol):
    """The loop's one exit for metrics (names from ``train/metrics.py``)."""

    def report(self, metrics: dict[str, float], checkpoint: Path | None = None) -> None:
        """Called by every rank once per step with ``step`` and ``train_loss``; at an evaluation also the
        validation metrics, throughput and memory figures, and ``checkpoint``: the directory holding this
        rank's part of the checkpoint, deleted when the call returns (a collective then)."""

    def close(self) -> None:
        """After the last step."""


def _all_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sums over every rank, read on the host: one device sync for the lot."""
    t = torch.stack([torch.as_tensor(v, device=device).double() for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class _Interval:
    """Training since the last evaluation: its token loss and throughput."""

    loss_sum: float = 0.0
    n_tokens: float = 0.0
    tokens_trained: int = 0  # input tokens over every rank
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss_sum: float, n_tokens: float, tokens_trained: int) -> None:
        self.loss_sum, self.n_tokens = self.loss_sum + loss_sum, self.n_tokens + n_tokens
        self.tokens_trained += tokens_trained
        self.steps += 1

    def metrics(self, flops_per_step: int | None, peak_flops: float | None) -> dict[str, float]:
        """The interval's mean loss and throughput; MFU on a GPU whose peak is known (for a model whose
        FLOPs could be counted: ``flops.step_flops``)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {M.TRAIN_LOSS_INTERVAL: self.loss_sum / max(self.n_tokens, 1),
               M.TOKENS_PER_S: self.tokens_trained / elapsed}
        if peak_flops and flops_per_step:
            out[M.MFU] = flops.mfu(flops_per_step, self.steps, elapsed, peak_flops)
        return out


def _resume(engine: Any, workload: Workload, ctx: WorkerContext) -> int:
    """Load the checkpoint ``ctx.resume`` fetches into the engine, the workload and the RNG; its step."""
    # Each rank fetches into a directory of its own: Ray's shared temporary download directory
    # (as_directory) raced between the ranks of one node, and one rank may delete it under another.
    with tempfile.TemporaryDirectory(prefix=f"rmt_resume_r{ctx.rank}_") as directory:
        state = checkpoint.load(engine, ctx.resume(Path(directory)), ctx.rank, ctx.world_size)
    workload.load_state_dict(state.workload)
    torch.set_rng_state(state.rng_cpu)
    if state.rng_cuda is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state.rng_cuda, ctx.device)
    return state.step


def _train_step(engine: Any, workload: Workload, step: int, device: torch.device) -> tuple[float, float]:
    """One optimizer step after ``step`` completed ones; the summed token loss and labelled tokens over
    every rank."""
    if workload.curriculum:
        workload.curriculum.update(step)  # a schedule counts completed steps
    engine.train()
    stats = workload.train_step(engine, partial(micro_step, engine))
    check_step_complete(engine)
    loss_sum, n_tokens = _all_sum([stats.loss_sum, stats.n_tokens], device)  # the step's one host sync
    return loss_sum, n_tokens


def _evaluate(engine: Any, workload: Workload, step: int, device: torch.device) -> dict[str, float]:
    """Validation metrics over every rank; a threshold curriculum then decides the next steps' stage."""
    engine.eval()
    val_loss, val_n, val_correct, *counts = _all_sum(list(workload.evaluate(engine)), device)
    out = M.validation_metrics(val_loss, int(val_n), int(val_correct), workload.metric)
    if counts:
        out.update(workload.extra_metrics(counts))
    if workload.curriculum:  # the segments evaluated at; a passed threshold adds one for the next steps
        out[M.SEGMENTS] = workload.curriculum.segments
        workload.curriculum.update(step, out.get(M.VAL_ACC))
    return out


def run(cfg: Config, ctx: WorkerContext, reporter: Reporter) -> None:
    """Train from ``ctx.resume`` (or from scratch) to ``train.max_steps``; see the module docstring."""
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    workload = make_workload(cfg, ctx.rank, ctx.world_size, ctx.device)
    with model_loading(cfg):
        model = build_model(cfg, workload.vocab_size)
        peak_flops = flops.peak_flops(ctx.device)  # None but on a known GPU
        flops_per_step = flops.step_flops(model, cfg) if peak_flops else None  # once, on a meta copy
        engine = build_engine(model, cfg)
    if ctx.resume is not None:
        step = _resume(engine, workload, ctx)
    else:
        step = 0
        torch.manual_seed(cfg.train.seed + 1000 * ctx.rank)  # per-rank dropout streams
    memory_state_bytes = model.state_bytes_per_sequence(model_dtype(cfg))

    interval = _Interval()
    while step < cfg.train.max_steps:
        loss_sum, n_tokens = _train_step(engine, workload, step, ctx.device)
        step += 1
        interval.add(loss_sum, n_tokens, workload.tokens_per_step * ctx.world_size)
        report = {M.STEP: step, M.TRAIN_LOSS: loss_sum / max(n_tokens, 1)}
        if step % cfg.train.eval_interval and step != cfg.train.max_steps:
            reporter.report(report)
            continue
        report.update(interval.metrics(flops_per_step, peak_flops))
        report.update(_evaluate(engine, workload, step, ctx.device))
        report.update({M.PEAK_MEM_BYTES: M.peak_mem_bytes(ctx.device), M.MEMORY_STATE_BYTES: memory_state_bytes})
        state = checkpoint.TrainerState(
            step=step, workload=workload.state_dict(), rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None)
        with tempfile.TemporaryDirectory(prefix="rmt_ckpt_") as tmp:
            checkpoint.save(engine, state, Path(tmp), ctx.rank, ctx.node_id)
            reporter.report(report, Path(tmp))
        interval = _Interval()
    reporter.close()
