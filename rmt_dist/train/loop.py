"""The per-worker training loop that Ray Train runs on every rank.

model -> DeepSpeed engine -> (resume) -> per step: forward/backward per BPTT mode, ``engine.step()``
-> every ``train.eval_interval`` steps: evaluate with memory carried over the validation stream,
save DeepSpeed shards + trainer state on every rank, ``ray.train.report(metrics, checkpoint)``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from rmt_dist.config import Config, from_flat
from rmt_dist.model import build_model
from rmt_dist.train import checkpoint, metrics as M
from rmt_dist.train.engine import build_engine, micro_step, model_loading
from rmt_dist.train.workloads import make_workload

# Fault injection for the fault-tolerance tests: "STEP:RANK:MARKER_FILE" makes RANK exit hard at STEP,
# once (the marker file records that it happened).
FAULT_ENV = "RMT_DIST_FAULT_AT_STEP"

PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _maybe_inject_fault(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if step == int(at_step) and rank == int(at_rank) and not Path(marker).exists():
        Path(marker).write_text("killed")
        os._exit(1)


def _all_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    t = torch.stack([torch.as_tensor(v, device=device).double() for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS_BF16.items() if k in name), None)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg: Config = from_flat(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    workload = make_workload(cfg, rank, world, device)
    with model_loading(cfg):
        model = build_model(cfg, workload.vocab_size)
        engine = build_engine(model, cfg)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: partitioned
    peak_flops = _peak_flops(device)

    step = 0
    resume = ray.train.get_checkpoint()
    if resume is not None:
        # Each rank downloads into a directory of its own: Ray's shared temporary download directory
        # (as_directory) races between the ranks of one node, and one rank may delete it under another.
        with tempfile.TemporaryDirectory(prefix=f"rmt_resume_r{rank}_") as directory:
            state = checkpoint.load(engine, Path(resume.to_directory(directory)), rank, world)
        step = state.step
        workload.load_state_dict(state.workload)
        torch.set_rng_state(state.rng_cpu)
        if state.rng_cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state.rng_cuda, device)
    else:
        torch.manual_seed(cfg.train.seed + 1000 * rank)  # per-rank dropout streams

    logger = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from rmt_dist.tracking import MetricLogger

        logger = MetricLogger(cfg, loop_config["mlflow_run_id"])
    progress = loop_config.get("progress")

    def backward(loss: torch.Tensor) -> None:
        micro_step(engine, loss)

    memory_state_bytes = engine.module.state_bytes_per_sequence(next(engine.module.parameters()).dtype)
    interval_loss, interval_tokens, interval_start = 0.0, 0, time.perf_counter()
    while step < cfg.train.max_steps:
        if workload.curriculum:
            workload.curriculum.update(step)  # a schedule counts completed steps
        engine.train()
        stats = workload.train_step(engine, backward)
        if not engine.is_gradient_accumulation_boundary() and engine.micro_steps % engine.gradient_accumulation_steps():
            raise RuntimeError("the recurrence made a different number of backward calls than "
                               "backward_calls_per_step() promised DeepSpeed")
        step += 1
        _maybe_inject_fault(step, rank)
        loss_sum, n_tokens = _all_sum([stats.loss_sum, stats.n_tokens], device)  # the step's one host sync
        interval_loss += loss_sum
        interval_tokens += n_tokens
        step_metrics = {M.TRAIN_LOSS: loss_sum / max(n_tokens, 1), M.STEP: step}
        if logger:
            logger.log({M.TRAIN_LOSS: step_metrics[M.TRAIN_LOSS]}, step)
        if progress is not None and rank == 0:
            progress.update.remote({"step": step, "max_steps": cfg.train.max_steps,
                                    "train_loss": step_metrics[M.TRAIN_LOSS]})
        if step % cfg.train.eval_interval and step != cfg.train.max_steps:
            continue

        steps_in_interval = step % cfg.train.eval_interval or cfg.train.eval_interval
        elapsed = time.perf_counter() - interval_start
        tokens_per_s = workload.tokens_per_step * world * steps_in_interval / max(elapsed, 1e-9)
        engine.eval()
        val_loss, val_n, val_correct, *counts = _all_sum(list(workload.evaluate(engine)), device)
        report = {
            M.STEP: step,
            M.TRAIN_LOSS: interval_loss / max(interval_tokens, 1),
            M.TOKENS_PER_S: tokens_per_s,
            M.PEAK_MEM_BYTES: M.peak_mem_bytes(device),
            M.MEMORY_STATE_BYTES: memory_state_bytes,
            **M.validation_metrics(val_loss, int(val_n), int(val_correct), workload.metric),
        }
        if counts:
            report.update(workload.extra_metrics(counts))
        if workload.curriculum:  # the segments evaluated at; a passed threshold adds one for the next steps
            report[M.SEGMENTS] = workload.curriculum.segments
            workload.curriculum.update(step, report.get(M.VAL_ACC))
        if peak_flops:
            report[M.MFU] = M.mfu(tokens_per_s / world, n_params, model.backbone.n_layers, model.backbone.d_model,
                                  cfg.data.segment_len, peak_flops)
        trainer_state = checkpoint.TrainerState(
            step=step, workload=workload.state_dict(), rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        with tempfile.TemporaryDirectory(prefix="rmt_ckpt_") as tmp:
            checkpoint.save(engine, trainer_state, Path(tmp), rank, ray.get_runtime_context().get_node_id())
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if logger:
            logger.log({k: v for k, v in report.items() if k != M.STEP}, step)
            logger.flush()
        if progress is not None and rank == 0:
            progress.update.remote({"step": step, "max_steps": cfg.train.max_steps, **report})
        interval_loss, interval_tokens, interval_start = 0.0, 0, time.perf_counter()
    if logger:
        logger.close()

