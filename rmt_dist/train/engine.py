"""DeepSpeed: the engine's config from ``deepspeed.*``/``train.*`` and its construction.

The only module that imports DeepSpeed. Gradient accumulation is unmanaged
(``managed_gradient_accumulation: false``): one optimizer step may follow several ``backward`` calls
(BPTT chunks, sliding re-runs, replay), and ``engine.step()`` is the one explicit boundary.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from rmt_dist.config import Config


def use_bf16(cfg: Config) -> bool:
    return cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and cfg.scaling.use_gpu)


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config for one worker's micro-batch of ``train.batch_size`` sequences."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: Config):
    """Multiplier of ``train.lr`` at a step: linear warmup, then constant, linear or cosine decay to 0."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        if t.lr_schedule == "linear":
            return 1.0 - progress
        if t.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_engine(model: torch.nn.Module, cfg: Config):
    """``deepspeed.initialize`` with AdamW and the warmup/decay schedule; returns the engine."""
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # imported late: DS_ACCELERATOR must be set first

    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    return engine
