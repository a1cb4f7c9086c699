"""What the benchmarks share: a model + optimizer + fixed batch whose ``step()`` is one training step,
timed in steady state, and the peak memory one step allocates (``metrics.peak_step_bytes``)."""

from __future__ import annotations

import argparse
import functools
import time

import torch

from rmt_dist.config import Config, validate
from rmt_dist.memory_kinds import memory_kind
from rmt_dist.model import build_model, split_segments, train_segments
from rmt_dist.train.metrics import peak_step_bytes


def add_model_arguments(parser: argparse.ArgumentParser, **defaults: int) -> None:
    """--d-model, --layers, --heads, --segment-len, --segments, --num-tokens, --batch, --vocab (defaults
    overridable by keyword: ``segment_len=512``)."""
    sizes = {"d_model": 256, "layers": 4, "heads": 4, "segment_len": 512, "segments": 2, "num_tokens": 10, "batch": 4,
             "vocab": 256, **defaults}
    for name, default in sizes.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def model_config(*, kind: str, d_model: int, layers: int, heads: int, segment_len: int, segments: int,
                 num_tokens: int = 0, xl_len: int = 0, bptt_unroll: int = -1, bptt_mode: str = "window",
                 replay: bool = False, activation_checkpointing: bool = False, recompute: str = "all",
                 ltm_basis: int = 64, compile_blocks: bool = False) -> Config:
    """A validated config of the built-in backbone (no dropout, d_ff = 4 d) with one memory kind."""
    cfg = Config()
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff, m.dropout = d_model, layers, heads, 4 * d_model, 0.0
    mem = cfg.memory
    mem.kind = kind
    spec = memory_kind(kind)
    mem.num_tokens = num_tokens if spec.memory_tokens else 0
    mem.xl_len = xl_len if spec.xl_cache else 0
    mem.bptt_unroll, mem.bptt_mode, mem.replay_backprop = bptt_unroll, bptt_mode, replay
    mem.ltm_basis = ltm_basis
    cfg.data.segment_len, cfg.data.num_segments = segment_len, segments
    cfg.train.activation_checkpointing, cfg.train.recompute = activation_checkpointing, recompute
    cfg.train.compile = compile_blocks
    return validate(cfg)


class MasterWeightAdamW:
    """AdamW the way DeepSpeed's bf16 mode runs it: the model holds bf16 weights (no casts in the step),
    the optimizer fp32 master copies; each backward call's bf16 gradients are added into fp32 master
    gradients as they arrive (then freed), the update runs on the masters and is copied back to bf16."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, fused: bool) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        for p, m in zip(self.params, self.master):
            p.register_post_accumulate_grad_hook(functools.partial(self._accumulate, master=m))
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, fused=fused)
        self.state = self.optimizer.state

    @staticmethod
    def _accumulate(p: torch.Tensor, master: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = p.grad.float()
        else:
            master.grad.add_(p.grad)
        p.grad = None

    def step(self) -> None:
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


PRECISIONS = ("fp32", "bf16", "autocast")


class Runner:
    """One model, its AdamW optimizer and a fixed random batch; ``step()`` is one training step
    (all segments, the configured BPTT mode, optimizer step).

    ``precision``: ``fp32``; ``bf16`` = bf16 weights with fp32 master weights in the optimizer, the path
    DeepSpeed's bf16 mode trains (``--bf16`` in every benchmark); ``autocast`` = bf16 autocast of fp32
    weights (what the benchmarks measured before issue 12: every matmul casts its fp32 weight first, which
    was 15-19% of GPU time). ``bf16=True`` is ``precision="bf16"``."""

    def __init__(self, cfg: Config, *, batch: int, vocab: int, device: torch.device, bf16: bool = False,
                 precision: str = "") -> None:
        precision = precision or ("bf16" if bf16 else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        torch.manual_seed(0)
        self.cfg, self.device, self.precision = cfg, device, precision
        self.model = build_model(cfg, vocab).to(device)
        fused = device.type == "cuda"
        if precision == "bf16":
            self.model.to(torch.bfloat16)
            self.optimizer = MasterWeightAdamW(list(self.model.parameters()), lr=1e-4, fused=fused)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused)
        length = cfg.data.num_segments * cfg.data.segment_len
        ids = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(1))
        self.segments = split_segments(ids[:, :-1].to(device), ids[:, 1:].to(device), cfg.data.segment_len)
        self.tokens = batch * length

    def forward_backward(self) -> torch.Tensor:
        """All segments forward and backward (gradients accumulate); the summed loss as a device tensor."""
        mem = self.cfg.memory
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "autocast"):
            stats = train_segments(self.model, self.segments, bptt_unroll=mem.bptt_unroll, bptt_mode=mem.bptt_mode,
                                   replay=mem.replay_backprop)
        return stats.loss_sum

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        loss = self.forward_backward()
        self.update()
        return float(loss)

    def seconds(self, steps: int) -> float:
        """Mean wall time of ``steps`` training steps."""
        return timed(self.step, steps, self.device)

    def peak_bytes(self) -> int:
        return peak_step_bytes(self.step, self.device)

    def resident_bytes(self) -> int:
        master = getattr(self.optimizer, "master", [])
        tensors = list(self.model.parameters()) + master + [t for s in self.optimizer.state.values()
                                                            for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def timed(step, steps: int, device: torch.device) -> float:
    """Mean seconds per call of ``step`` over ``steps`` calls (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps
