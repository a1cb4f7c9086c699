"""Metric names (shared by MLflow, Tune and the CLI summary) and the process's memory figures."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
from typing import Any, Callable

import torch

TRAIN_LOSS = "train_loss"  # the step's mean token loss over every rank, reported every step
TRAIN_LOSS_INTERVAL = "train_loss_interval"  # the same over every step since the last evaluation
VAL_LOSS = "val_loss"
VAL_PPL = "val_ppl"
VAL_BPC = "val_bpc"
VAL_ACC = "val_acc"
VAL_F1 = "val_f1"  # classification: macro F1 over the classes
SEGMENTS = "segments"  # sample workloads (tasks, classification): segments per sample the evaluation ran at
# (data.num_segments, or the stage of train.curriculum)
TOKENS_PER_S = "tokens_per_s"
PEAK_MEM_BYTES = "peak_mem_bytes"
MEMORY_STATE_BYTES = "memory_state_bytes"
STEP = "step"
MFU = "mfu"

# Which validation metric a workload is judged by, and whether lower is better.
PRIMARY = {"ppl": (VAL_PPL, "min"), "bpc": (VAL_BPC, "min"), "acc": (VAL_ACC, "max")}

def peak_mem_bytes(device: torch.device) -> int:
    """Accelerator peak on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_step_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Bytes one call of ``step`` allocates above what was allocated before it. On CUDA
    ``torch.cuda.max_memory_allocated``; on CPU (which keeps no such counter) the running total of the
    allocator's events that ``torch.profiler`` records with ``profile_memory=True``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    allocations = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                         if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
    running = peak = 0
    for _, nbytes in allocations:
        running += nbytes
        peak = max(peak, running)
    return peak


def validation_metrics(loss_sum: float, n_tokens: int, correct: int, metric: str) -> dict[str, float]:
    """val_loss plus the workload's own figure: perplexity, bits per character or accuracy."""
    loss = loss_sum / max(n_tokens, 1)
    out = {VAL_LOSS: loss}
    if metric == "ppl":
        out[VAL_PPL] = math.exp(min(loss, 50.0))
    elif metric == "bpc":
        out[VAL_BPC] = loss / math.log(2)
    else:
        out[VAL_ACC] = correct / max(n_tokens, 1)
    return out


def macro_f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> float:
    """Mean over classes of 2TP / (2TP + FP + FN); a class never predicted nor present counts as 1."""
    denominator = 2 * tp + fp + fn
    per_class = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
    return float(per_class.mean())
