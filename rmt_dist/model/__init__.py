"""Models: the built-in backbone, memory kinds and the recurrence over segments (torch only)."""

from __future__ import annotations

from rmt_dist.config import Config
from rmt_dist.constants import IGNORE_INDEX, PAD_ID, Segment
from rmt_dist.model.backbone import TransformerBackbone, apply_compile
from rmt_dist.model.hf import build_hf_model, from_pretrained, save_pretrained
from rmt_dist.model.memory import MemoryModel, MemoryState, SegmentOutput
from rmt_dist.model.recurrence import (
    StepStats,
    StreamState,
    evaluate_segments,
    forward_segments,
    split_segments,
    stream_train_step,
    train_segments,
)


def build_model(cfg: Config, vocab_size: int | None = None) -> MemoryModel:
    """The model that ``cfg.model`` and ``cfg.memory`` describe; ``vocab_size`` overrides model.vocab_size."""
    vocab = vocab_size or cfg.model.vocab_size
    if cfg.model.backbone == "hf":
        return build_hf_model(cfg, vocab)
    if vocab < 1:
        raise ValueError("model.vocab_size must be set (>= 1) or taken from the data's tokenizer")
    aux_class = 1 if cfg.memory.aux_loss_weight > 0 else 0
    backbone = TransformerBackbone(cfg.model, vocab, out_size=vocab + aux_class)
    backbone.activation_checkpointing = cfg.train.activation_checkpointing
    backbone.recompute = cfg.train.recompute
    if cfg.train.compile:
        apply_compile(backbone)
    return MemoryModel(backbone, cfg.memory, vocab)


__all__ = [
    "IGNORE_INDEX", "PAD_ID", "MemoryModel", "MemoryState", "Segment", "SegmentOutput", "StepStats", "StreamState",
    "TransformerBackbone", "build_model", "from_pretrained", "save_pretrained", "evaluate_segments", "forward_segments", "split_segments",
    "stream_train_step", "train_segments",
]
