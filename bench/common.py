"""What the benchmarks share: a model + optimizer + fixed batch whose ``step()`` is one training step,
timed in steady state, and the peak memory one step allocates (``metrics.peak_step_bytes``)."""

from __future__ import annotations

import time

import torch

from rmt_dist.config import Config, validate
from rmt_dist.memory_kinds import memory_kind
from rmt_dist.model import build_model, split_segments, train_segments
from rmt_dist.train.metrics import peak_step_bytes


def model_config(*, kind: str, d_model: int, layers: int, heads: int, segment_len: int, segments: int,
                 num_tokens: int = 0, xl_len: int = 0, bptt_unroll: int = -1, bptt_mode: str = "window",
                 replay: bool = False, activation_checkpointing: bool = False, recompute: str = "all",
                 ltm_basis: int = 64) -> Config:
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
    return validate(cfg)


class Runner:
    """One model, its AdamW optimizer and a fixed random batch; ``step()`` is one training step
    (all segments, the configured BPTT mode, optimizer step)."""

    def __init__(self, cfg: Config, *, batch: int, vocab: int, device: torch.device, bf16: bool = False) -> None:
        torch.manual_seed(0)
        self.cfg, self.device, self.autocast = cfg, device, bf16
        self.model = build_model(cfg, vocab).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        length = cfg.data.num_segments * cfg.data.segment_len
        ids = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(1))
        self.segments = split_segments(ids[:, :-1].to(device), ids[:, 1:].to(device), cfg.data.segment_len)
        self.tokens = batch * length

    def step(self) -> float:
        mem = self.cfg.memory
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            stats = train_segments(self.model, self.segments, bptt_unroll=mem.bptt_unroll, bptt_mode=mem.bptt_mode,
                                   replay=mem.replay_backprop)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(stats.loss_sum)

    def seconds(self, steps: int) -> float:
        """Mean wall time of ``steps`` training steps."""
        return timed(self.step, steps, self.device)

    def peak_bytes(self) -> int:
        return peak_step_bytes(self.step, self.device)

    def resident_bytes(self) -> int:
        tensors = list(self.model.parameters()) + [t for s in self.optimizer.state.values() for t in s.values()
                                                   if torch.is_tensor(t)]
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
