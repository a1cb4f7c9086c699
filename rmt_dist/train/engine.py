"""DeepSpeed: the engine's config from ``deepspeed.*``/``train.*``, its construction, and what the loop
asks of it (a backward call, the end-of-step check, the precision).

The training loop reaches DeepSpeed only through this module. Two others import it for one job each:
``model/hf.py`` gathers the ZeRO-3-partitioned embedding to scale the initial memory, and
``train/export.py`` consolidates ZeRO shards (``zero_to_fp32``); the model and the recurrence see only a
``backward`` callable (:func:`micro_step`).

One optimizer step follows several ``backward`` calls (BPTT chunks, sliding re-runs, replay):
DeepSpeed's own gradient accumulation counts them (``gradient_accumulation_steps`` = backward calls per
step, ``engine.step()`` after each). Its unmanaged mode (``managed_gradient_accumulation: false``, one
``step`` after many backwards) lost all but the last backward's gradients under ZeRO-3 here (DeepSpeed
0.19.8), so it is not used.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import torch

from rmt_dist.config import Config
from rmt_dist.train.zero3 import trace_whole_steps


def use_bf16(cfg: Config) -> bool:
    return cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and cfg.scaling.use_gpu)


def model_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the engine's module weights (and of the memory it carries): DeepSpeed's bf16 mode
    casts the module to bf16 and keeps fp32 masters in the optimizer."""
    return torch.bfloat16 if use_bf16(cfg) else torch.float32


def backward_calls_per_step(cfg: Config) -> int:
    """How many ``backward`` calls the recurrence makes per optimizer step (see model/recurrence.py)."""
    k, segments = cfg.memory.bptt_unroll, cfg.data.num_segments
    if cfg.memory.replay_backprop:
        return segments
    if k == -1:
        return 1
    if cfg.memory.bptt_mode == "sliding":
        return segments
    return math.ceil(segments / (k + 1))


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config for one worker's micro-batch of ``train.batch_size`` sequences."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if ds.zero_stage == 3:
        # DeepSpeed's defaults, stated: they act only on a complete module trace, which the recurrence gets from
        # train/zero3.py's trace_whole_steps (bench/zero3.py). A parameter stays gathered between its uses in a step
        # when they are within max_reuse_distance elements: models under 1e9 parameters are gathered once per step.
        zero.update(stage3_max_reuse_distance=int(1e9), stage3_max_live_parameters=int(1e9),
                    stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e5))
        # (Blocks as ZeRO-3 leaf modules, "leaf_module": {"names": [...]}, would halve the hooks, but a block used by
        # several segments in one backward then fails: duplicate ds_id in a gradient bucket, DeepSpeed 0.19.8.)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": backward_calls_per_step(cfg),
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


@contextlib.contextmanager
def model_loading(cfg: Config) -> Iterator[None]:
    """Build the model and its engine inside this. Under ZeRO-3 a pretrained Hugging Face model is then
    partitioned while it loads (transformers' ``HfDeepSpeedConfig`` makes ``from_pretrained`` construct it
    under ``deepspeed.zero.Init`` and load each weight into its shards), so no worker holds it whole;
    the parameters MemoryModel adds are partitioned by ``deepspeed.initialize``."""
    if cfg.model.backbone != "hf" or cfg.deepspeed.zero_stage != 3:
        yield
        return
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(deepspeed_config(cfg))  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def build_engine(model: torch.nn.Module, cfg: Config):
    """``deepspeed.initialize`` with AdamW (or SGD) and the warmup/decay schedule; returns the engine.

    Drive it with :func:`micro_step` as the recurrence's ``backward``; the optimizer steps on the
    last backward call of each training step.
    """
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
    trace_whole_steps(engine)  # ZeRO-3: gather each parameter once per step, not once per segment
    return engine


def micro_step(engine: Any, loss: torch.Tensor) -> None:
    """One backward call of a training step. Losses come pre-normalised by the recurrence, so
    DeepSpeed must not divide them by the accumulation count; ``step`` updates only on the boundary."""
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def check_step_complete(engine: Any) -> None:
    """After a training step: the optimizer stepped, i.e. the recurrence made as many backward calls as
    :func:`backward_calls_per_step` promised DeepSpeed (else gradients would leak into the next step)."""
    if not engine.is_gradient_accumulation_boundary() and engine.micro_steps % engine.gradient_accumulation_steps():
        raise RuntimeError("the recurrence made a different number of backward calls than "
                           "backward_calls_per_step() promised DeepSpeed")
