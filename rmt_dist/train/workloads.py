"""What a worker trains on: LM streams (memory carried across steps) or task samples (memory reset).

``model`` below is the DeepSpeed engine (or a bare MemoryModel in tests): the recurrence calls it.
All expose the same small surface to the loop: ``vocab_size``, ``metric``, ``tokens_per_step``,
``curriculum`` (sample workloads; None for streams), ``train_step(model, backward)``, ``evaluate(model)``
(loss, tokens, correct, then any counts ``extra_metrics`` turns into metrics), and ``state_dict()`` /
``load_state_dict(...)``: where the data reader is (``position``) and, for streams, the recurrent state it
carries (``stream``), the part of a checkpoint that DeepSpeed does not hold.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from rmt_dist.config import Config, apply_overrides
from rmt_dist.data import DataError, LMStreams, load_lm_corpus, load_task_splits, task_batches
from rmt_dist.data.classify import IGNORE_INDEX, last_label_only, load_classify_splits
from rmt_dist.data.corpus import hf_tokenizer
from rmt_dist.model import MemoryModel, Segment, StepStats, StreamState, evaluate_segments, forward_segments, \
    split_segments, stream_train_step, train_segments
from rmt_dist.model.recurrence import Backward
from rmt_dist.train import metrics as M
from rmt_dist.train.curriculum import Curriculum
from rmt_dist.workload_kinds import dataset_kind


def _to(segments: list[Segment], device: torch.device) -> list[Segment]:
    return [(ids.to(device), labels.to(device)) for ids, labels in segments]


class LMWorkload:
    """Transformer-XL-style streams: ``batch x world`` contiguous streams, this rank reads its own."""

    @staticmethod
    def prepare(cfg: Config) -> int:
        """On the driver, before any worker: tokenize the corpus once (workers then hit the cache), check
        that each split holds a window of every stream; returns the vocabulary size."""
        corpus = load_lm_corpus(cfg.data, hf_tokenizer(cfg))
        needed = cfg.data.segment_len * cfg.data.num_segments * cfg.train.batch_size * cfg.scaling.num_workers
        for split, tokens in (("train", corpus.train), ("valid", corpus.valid)):
            if len(tokens) <= needed:
                raise DataError(
                    f"data: the {split} split has {len(tokens)} tokens, fewer than one window of "
                    f"data.segment_len x data.num_segments x train.batch_size x scaling.num_workers = {needed}")
        return corpus.vocab_size

    @staticmethod
    def class_names(cfg: Config) -> list[str] | None:
        """What the output classes are called, for an exported model's config (None: a vocabulary)."""
        return None

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        corpus = load_lm_corpus(cfg.data, hf_tokenizer(cfg))
        self.vocab_size = corpus.vocab_size
        self.metric = corpus.metric
        self._valid = corpus.valid
        d = cfg.data
        self.streams = LMStreams(corpus.train, cfg.train.batch_size, world, rank, d.segment_len, d.num_segments)
        self._windows: Iterator[list[Segment]] = iter(self.streams)
        self.stream_state = StreamState()
        self.tokens_per_step = cfg.train.batch_size * d.segment_len * d.num_segments
        self.curriculum = None

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

    def state_dict(self) -> dict[str, Any]:
        """The next window of this rank's streams and their recurrent state (on the CPU)."""
        return {"position": self.streams.position, "stream": self.stream_state.to(torch.device("cpu")).state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streams.seek(state["position"])
        self._windows = iter(self.streams)
        stream = StreamState()
        stream.load_state_dict(state["stream"])
        self.stream_state = stream.to(self.device)


class TaskWorkload:
    """Samples of K segments, memory reset per sample; accuracy over the target tokens. With a curriculum
    (retrieval tasks) a stage of k < K segments trains on the same task made k segments long."""

    metric = "acc"
    class_names = LMWorkload.class_names

    @staticmethod
    def prepare(cfg: Config) -> int:
        """On the driver: generate the splits once; returns the vocabulary size."""
        return load_task_splits(cfg.data).vocab_size

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.curriculum = Curriculum(cfg)
        self._stage = self.curriculum.segments
        self.splits = self._load(self._stage)
        self.vocab_size = self.num_classes()
        self.epoch, self.batch_index = 0, 0
        self._batches = self._epoch_batches()

    def _load(self, segments: int) -> Any:
        d = self.cfg.data
        if segments == d.num_segments:
            return load_task_splits(d)
        shorter = d.task_length - (d.num_segments - segments) * d.segment_len  # retrieval: source chars
        return load_task_splits(apply_overrides(self.cfg, {"data.num_segments": segments,
                                                           "data.task_length": shorter}).data)

    def num_classes(self) -> int:
        return self.splits.vocab_size

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.curriculum.segments * self.cfg.data.segment_len

    def _follow_curriculum(self) -> None:
        if self._stage != self.curriculum.segments:
            self._stage = self.curriculum.segments
            self.splits = self._load(self._stage)
            self._batches = self._epoch_batches()

    def _segments(self, ids: torch.Tensor, labels: torch.Tensor) -> list[Segment]:
        return _to(split_segments(ids, labels, self.cfg.data.segment_len), self.device)

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
        self._follow_curriculum()
        segments = self._segments(*self._next_batch())
        mem = self.cfg.memory
        return train_segments(model, segments, None, bptt_unroll=mem.bptt_unroll, bptt_mode=mem.bptt_mode,
                              replay=mem.replay_backprop, backward=backward)

    def _valid_batches(self) -> Iterator[list[Segment]]:
        self._follow_curriculum()
        batches = task_batches(self.splits.valid, self.cfg.train.batch_size, self.world, self.rank, epoch=0,
                               shuffle=False)
        for i, (ids, labels) in enumerate(batches):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            yield self._segments(ids, labels)

    def evaluate(self, model: MemoryModel) -> tuple[float, ...]:
        loss, n, correct = 0.0, 0, 0
        for segments in self._valid_batches():
            b_loss, b_n, b_correct, _ = evaluate_segments(model, segments)
            loss, n, correct = loss + b_loss, n + b_n, correct + b_correct
        return loss, n, correct

    def extra_metrics(self, counts: list[float]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The next batch and the curriculum's stage (no recurrent state: memory resets per sample)."""
        return {"position": {"epoch": self.epoch, "batch_index": self.batch_index,
                             "segments": self.curriculum.segments}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = state["position"]
        self.epoch, self.batch_index = position["epoch"], position["batch_index"]
        self.curriculum.segments = position.get("segments", self.curriculum.segments)
        self._stage = -1  # reload for the restored stage
        self._follow_curriculum()


class ClassifyWorkload(TaskWorkload):
    """Long documents, one class each (``data/classify.py``); a curriculum stage reads the first k
    segments of each document. Validation adds macro F1 over the classes."""

    @staticmethod
    def prepare(cfg: Config) -> int:
        """On the driver: read and tokenize the documents once; returns the number of classes."""
        return load_classify_splits(cfg.data, cfg.model.hf_name_or_path).num_classes

    @staticmethod
    def class_names(cfg: Config) -> list[str] | None:
        return load_classify_splits(cfg.data, cfg.model.hf_name_or_path).classes

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        self._documents = load_classify_splits(cfg.data, cfg.model.hf_name_or_path)
        super().__init__(cfg, rank, world, device)

    def _load(self, segments: int) -> Any:
        return self._documents

    def num_classes(self) -> int:
        return self.splits.num_classes

    def _segments(self, ids: torch.Tensor, labels: torch.Tensor) -> list[Segment]:
        used = self.curriculum.segments * self.cfg.data.segment_len
        return super()._segments(ids[:, :used], last_label_only(labels[:, :used]))

    def evaluate(self, model: MemoryModel) -> tuple[float, ...]:
        """loss, labelled documents, correct, then per class: true positives, false positives, false negatives."""
        C = self.num_classes()
        loss, n, correct = 0.0, 0, 0
        tp, fp, fn = torch.zeros(C), torch.zeros(C), torch.zeros(C)
        with torch.no_grad():
            for segments in self._valid_batches():
                outputs, _ = forward_segments(model, segments)
                for out, (_, labels) in zip(outputs, segments):
                    marked = labels != IGNORE_INDEX
                    truth, pred = labels[marked].cpu(), out.logits[marked].argmax(-1).cpu()
                    loss, n, correct = loss + out.loss_sum.item(), n + len(truth), correct + int((pred == truth).sum())
                    tp += torch.bincount(truth[pred == truth], minlength=C)
                    fp += torch.bincount(pred[pred != truth], minlength=C)
                    fn += torch.bincount(truth[pred != truth], minlength=C)
        return (loss, n, correct, *tp.tolist(), *fp.tolist(), *fn.tolist())

    def extra_metrics(self, counts: list[float]) -> dict[str, float]:
        tp, fp, fn = torch.tensor(counts).view(3, -1)
        return {M.VAL_F1: M.macro_f1(tp, fp, fn)}


WORKLOADS: dict[str, type[LMWorkload] | type[TaskWorkload]] = {
    "lm": LMWorkload, "task": TaskWorkload, "classify": ClassifyWorkload}


def workload_class(cfg: Config) -> type[LMWorkload] | type[TaskWorkload]:
    """The class that trains ``data.dataset`` (``rmt_dist/workload_kinds.py`` says which workload it is)."""
    return WORKLOADS[dataset_kind(cfg.data.dataset).workload]


def make_workload(cfg: Config, rank: int, world: int, device: torch.device) -> LMWorkload | TaskWorkload:
    return workload_class(cfg)(cfg, rank, world, device)
