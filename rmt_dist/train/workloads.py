"""What a worker trains on: LM streams (memory carried across steps) or task samples (memory reset).

``model`` below is the DeepSpeed engine (or a bare MemoryModel in tests): the recurrence calls it.
Both expose the same small surface to the loop: ``vocab_size``, ``metric``, ``tokens_per_step``,
``train_step(model, backward)``, ``evaluate(model)``, ``position()`` / ``restore(...)``.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from rmt_dist.config import Config
from rmt_dist.data import LMStreams, load_lm_corpus, load_task_splits, task_batches
from rmt_dist.model import MemoryModel, Segment, StepStats, StreamState, evaluate_segments, split_segments, \
    stream_train_step, train_segments
from rmt_dist.model.recurrence import Backward


def _to(segments: list[Segment], device: torch.device) -> list[Segment]:
    return [(ids.to(device), labels.to(device)) for ids, labels in segments]


def stream_to(stream: StreamState, device: torch.device) -> StreamState:
    return StreamState(state=stream.state.map(lambda t: t.to(device)), history=_to(stream.history, device))


class LMWorkload:
    """Transformer-XL-style streams: ``batch x world`` contiguous streams, this rank reads its own."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        corpus = load_lm_corpus(cfg.data)
        self.vocab_size = corpus.vocab_size
        self.metric = corpus.metric
        self._valid = corpus.valid
        d = cfg.data
        self.streams = LMStreams(corpus.train, cfg.train.batch_size, world, rank, d.segment_len, d.num_segments)
        self._windows: Iterator[list[Segment]] = iter(self.streams)
        self.stream_state = StreamState()
        self.tokens_per_step = cfg.train.batch_size * d.segment_len * d.num_segments

    def train_step(self, model: MemoryModel, backward: Backward) -> StepStats:
        window = _to(next(self._windows), self.device)
        mem = self.cfg.memory
        stats, stream = stream_train_step(model, self.stream_state, window, bptt_unroll=mem.bptt_unroll,
                                          bptt_mode=mem.bptt_mode, replay=mem.replay_backprop, backward=backward)
        self.stream_state = stream
        return stats

    def evaluate(self, model: MemoryModel) -> tuple[float, int, int]:
        d, limit = self.cfg.data, self.cfg.train.eval_batches
        streams = LMStreams(self._valid, self.cfg.train.batch_size, self.world, self.rank, d.segment_len,
                            d.num_segments)
        loss, n, correct, state = 0.0, 0, 0, None
        for i, window in enumerate(streams.epoch_windows()):
            if limit and i >= limit:
                break
            window_loss, window_n, window_correct, state = evaluate_segments(model, _to(window, self.device), state)
            loss, n, correct = loss + window_loss, n + window_n, correct + window_correct
        return loss, n, correct

    def position(self) -> Any:
        return self.streams.position

    def restore(self, position: Any, stream: StreamState | None) -> None:
        self.streams.seek(position)
        self._windows = iter(self.streams)
        self.stream_state = stream_to(stream or StreamState(), self.device)


class TaskWorkload:
    """Samples of K segments, memory reset per sample; accuracy over the target tokens."""

    metric = "acc"

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.splits = load_task_splits(cfg.data)
        self.vocab_size = self.splits.vocab_size
        self.tokens_per_step = cfg.train.batch_size * self.splits.sample_len
        self.epoch, self.batch_index = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return task_batches(self.splits.train, self.cfg.train.batch_size, self.world, self.rank, epoch=self.epoch,
                            shuffle=True, seed=self.cfg.train.seed, start_batch=self.batch_index)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self._batches)
        except StopIteration:
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._batches = self._epoch_batches()
            batch = next(self._batches)
        self.batch_index += 1
        return batch

    def train_step(self, model: MemoryModel, backward: Backward) -> StepStats:
        ids, labels = self._next_batch()
        segments = _to(split_segments(ids, labels, self.cfg.data.segment_len), self.device)
        mem = self.cfg.memory
        return train_segments(model, segments, None, bptt_unroll=mem.bptt_unroll, bptt_mode=mem.bptt_mode,
                              replay=mem.replay_backprop, backward=backward)

    def evaluate(self, model: MemoryModel) -> tuple[float, int, int]:
        loss, n, correct = 0.0, 0, 0
        batches = task_batches(self.splits.valid, self.cfg.train.batch_size, self.world, self.rank, epoch=0,
                               shuffle=False)
        for i, (ids, labels) in enumerate(batches):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            segments = _to(split_segments(ids, labels, self.cfg.data.segment_len), self.device)
            b_loss, b_n, b_correct, _ = evaluate_segments(model, segments)
            loss, n, correct = loss + b_loss, n + b_n, correct + b_correct
        return loss, n, correct

    def position(self) -> Any:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def restore(self, position: Any, stream: StreamState | None) -> None:
        self.epoch, self.batch_index = position["epoch"], position["batch_index"]
        self._batches = self._epoch_batches()


def make_workload(cfg: Config, rank: int, world: int, device: torch.device) -> LMWorkload | TaskWorkload:
    if cfg.data.dataset == "task":
        return TaskWorkload(cfg, rank, world, device)
    return LMWorkload(cfg, rank, world, device)
