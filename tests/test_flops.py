"""Counted FLOPs (``train/flops.py``): exactly the matmul FLOPs a step executes, memory positions, sliding
re-runs, replay and checkpointed recomputation included; the dense bf16 peaks by device name."""

from __future__ import annotations

import pytest
import torch

from rmt_dist.config import Config, validate
from rmt_dist.model import build_model
from rmt_dist.train import flops

D, LAYERS, D_FF, VOCAB, L, SEGMENTS, B, M = 32, 2, 64, 50, 8, 4, 2, 3


def config(kind: str = "rmt", dataset: str = "task", **memory) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = D, LAYERS, 4, D_FF
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.bptt_unroll, cfg.memory.bptt_mode = kind, M, -1, "window"
    for key, value in memory.items():
        setattr(cfg.memory, key, value)
    cfg.data.dataset, cfg.data.segment_len, cfg.data.num_segments, cfg.train.batch_size = dataset, L, SEGMENTS, B
    return validate(cfg)


def counted(cfg: Config) -> int:
    return flops.step_flops(build_model(cfg, VOCAB), cfg)


def blocks_forward(positions: int) -> int:
    """Matmul FLOPs of the blocks' forward over one segment of ``positions`` for the batch: q, kv, out and
    the MLP (2 FLOPs per multiply-add) plus attention's two [T, T] products per layer."""
    per_layer = positions * (2 * D * D + 2 * D * 2 * D + 2 * D * D + 2 * 2 * D * D_FF) + 2 * 2 * positions * positions * D
    return B * LAYERS * per_layer


HEAD = B * L * 2 * D * VOCAB  # the LM head over a segment's tokens (not over memory positions)


@pytest.mark.parametrize("kind, positions", [("none", L), ("rmt", L + 2 * M), ("memtr", L + M)])
def test_full_bptt_counts_forward_and_backward_of_every_position(kind: str, positions: int) -> None:
    """Backward is twice the forward's matmuls; memory positions go through every block, not the head."""
    assert counted(config(kind)) == 3 * SEGMENTS * (blocks_forward(positions) + HEAD)


def test_sliding_reruns_replay_and_checkpointing_are_counted() -> None:
    full = counted(config())
    a = blocks_forward(L + 2 * M)
    # sliding k=2 over 4 segments: a no-grad pass over all, then segment j re-runs min(j, 2) earlier ones
    # with gradients (forward + backward, no head): 0 + 1 + 2 + 2 = 5 re-runs.
    assert counted(config(bptt_unroll=2, bptt_mode="sliding")) == full + SEGMENTS * a + 3 * 5 * a
    # LM streams in steady state: every segment re-runs 2, the no-grad pass covers the 2 kept from before.
    assert counted(config(dataset="smoke", bptt_unroll=2, bptt_mode="sliding")) == full + 6 * a + 3 * 8 * a
    assert counted(config(replay_backprop=True)) == full + SEGMENTS * a  # the no-grad pass, then recompute
    checkpointed = config()
    checkpointed.train.activation_checkpointing = True
    # Each block's forward again in backward, but for its last matmul: non-reentrant checkpointing stops
    # recomputing once every tensor backward needs is back (the MLP's output is not one of them).
    last_matmul = B * LAYERS * (L + 2 * M) * 2 * D_FF * D
    assert counted(checkpointed) == full + SEGMENTS * (a - last_matmul)


def test_counting_leaves_the_model_untouched() -> None:
    cfg = config()
    model = build_model(cfg, VOCAB)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flops.step_flops(model, cfg)
    assert all(p.device.type == "cpu" and p.grad is None and torch.equal(p, before[n])
               for n, p in model.named_parameters())


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_dense_bf16_peak_by_device_name(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.peak_flops(torch.device("cuda", 0)) == peak
    assert flops.peak_flops(torch.device("cpu")) is None


def test_a_model_that_reads_values_is_not_counted_and_not_broken(tmp_path) -> None:
    """An HF encoder's padding check runs on the host (transformers): no count on meta, and no crash."""
    from rmt_dist.config import from_flat

    from hf_tiny import bert_dir

    cfg = validate(from_flat({"model.backbone": "hf", "model.hf_name_or_path": bert_dir(tmp_path),
                              "memory.kind": "rmt", "memory.num_tokens": 2, "data.dataset": "classify",
                              "data.path": "docs.jsonl", "data.segment_len": L, "data.num_segments": 2,
                              "memory.bptt_unroll": -1, "train.batch_size": B}))
    assert flops.step_flops(build_model(cfg, 2), cfg) is None
