"""FLOPs of one training step, counted, and MFU that means the same thing for every configuration.

The PaLM formula (6N + 12·L·d·T per token) knows neither memory positions nor the XL
cache's extra keys nor the segments a step runs twice (sliding BPTT's re-runs, replay's recomputation,
activation checkpointing). Here the FLOPs are counted: :func:`step_flops` runs one real training step of
the model under ``torch.utils.flop_counter.FlopCounterMode``, on the ``meta`` device (shapes only: no data,
no time, nothing allocated; the whole recurrence runs there, see ``tests/test_devices.py``). So MFU is
"FLOPs the step executes / seconds / the device's dense bf16 peak", and recomputation counts as work done:
it tells how busy the device is; step time tells what a configuration costs.

Counted: matmuls (``mm``, ``addmm``, ``bmm``) forward and backward; attention on ``meta`` runs SDPA's math
path, two ``bmm`` over all of [T, C + T] whatever the mask (a causal mask is not discounted, as in
PaLM's 12·L·d·T). Not counted: elementwise ops, norms, softmax (a few percent).

The loop (``train/loop.py``) counts ``step_flops(model, cfg)`` once per run, before
``deepspeed.initialize`` (this worker's micro-batch, one optimizer step), and reports
``mfu(flops_per_step, steps, seconds, peak_flops(device))`` for each evaluation interval on a GPU whose
peak is known.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rmt_dist.config import Config
from rmt_dist.model import StreamState, stream_train_step, train_segments
from rmt_dist.model.backbone import run_block
from rmt_dist.workload_kinds import dataset_kind

META = torch.device("meta")

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets: A100 (40 and 80 GB, SXM
# and PCIe) 312 TFLOPS; H100 SXM 989 and H100 NVL 835 (H100 datasheet, 2024: 1,979 / 1,671 "with sparsity",
# halved); H100 PCIe 756 (H100 PCIe product brief: 1,513 with sparsity); H200 SXM 989, H200 NVL 835 (H200
# datasheet: 1,979 / 1,671 with sparsity); L4 121 (L4 datasheet: 242 with sparsity); L40S 362.05 (L40S
# datasheet: 733 with sparsity). Keys are matched in order against torch.cuda.get_device_name().
PEAK_FLOPS_BF16 = {
    "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "H200 NVL": 835e12, "H200": 989e12,
    "A100": 312e12, "L40S": 362e12, "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS_BF16.items() if k in name), None)


def mfu(flops_per_step: float, steps: int, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation of one worker: ``steps`` steps of ``flops_per_step`` in ``seconds``."""
    return flops_per_step * steps / max(seconds, 1e-12) / peak


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on ``meta`` (nothing of the original is copied
    or touched; ZeRO-3-partitioned parameters get their full ``ds_shape``), eager (no compiled blocks)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device=META)
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        if hasattr(module, "run_block"):
            module.run_block = run_block
        if hasattr(module, "_constants"):
            module._constants = {}
    return clone


class _TotalOnly:
    """Stands in for FlopCounterMode's ModuleTracker (per-module attribution, not wanted here), which fails
    on a module whose no-grad output is a view of a parameter (``InitialMemory`` in the recurrence's no-grad
    passes: ``requires_grad`` without ``grad_fn``; torch 2.13): everything counts as "Global"."""

    parents = {"Global"}

    def __enter__(self) -> "_TotalOnly":
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def _counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalOnly()
    return counter


def step_flops(model: nn.Module, cfg: Config, batch_size: int | None = None) -> int | None:
    """FLOPs of one optimizer step of ``model`` as ``cfg`` trains it: ``train.batch_size`` sequences of
    ``data.num_segments`` x ``data.segment_len`` tokens, ``memory.*``'s BPTT mode; for LM streams the
    steady state (sliding BPTT re-runs the k segments kept from the previous step), for samples a step
    from the initial memory. Counted on a meta copy: ``model`` is left as it was.

    None where the model's own code reads tensor values, which ``meta`` cannot give: transformers checks
    an encoder's padding mask and a causal model's position ids on the host (HF encoders; HF kind none)."""
    try:
        return _count_step(model, cfg, batch_size)
    except RuntimeError as err:
        if "meta tensors" not in str(err):  # "Tensor.item() cannot be called on meta tensors"
            raise
        return None


def _count_step(model: nn.Module, cfg: Config, batch_size: int | None) -> int:
    clone = meta_copy(model).train()
    batch = batch_size or cfg.train.batch_size
    d, mem = cfg.data, cfg.memory
    ids = torch.zeros(batch, d.num_segments * d.segment_len, dtype=torch.long, device=META)
    segments = [(ids[:, i:i + d.segment_len], ids[:, i:i + d.segment_len])
                for i in range(0, ids.shape[1], d.segment_len)]
    modes = dict(bptt_unroll=mem.bptt_unroll, bptt_mode=mem.bptt_mode, replay=mem.replay_backprop)
    if dataset_kind(d.dataset).samples:
        with _counter() as counter:
            train_segments(clone, segments, **modes)
    else:
        _, stream = stream_train_step(clone, StreamState(), segments, **modes)  # fills the history
        with _counter() as counter:
            stream_train_step(clone, stream, segments, **modes)
    return int(counter.get_total_flops())
