"""The paper's tasks as ``datasets.Dataset`` splits on disk, and their batches for data-parallel ranks.

A split's rows are ``input_ids`` and ``labels``, both ``sample_len = segment_len x num_segments`` long:
``source | target`` without its last token, padded with ``_``; labels are the next token over the
target part and -100 elsewhere, so the loss covers the target only (the model resets memory per sample).
Splits are generated deterministically from (task, task_length, sizes, data.seed), test first, then
valid, then train, each drawing only sources no earlier sample has, so no held-out sample is in train.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa
import torch

from rmt_dist.config import DataConfig
from rmt_dist.constants import IGNORE_INDEX, SPLITS
from rmt_dist.data.cache import build_once, cache_root, entry_key
from rmt_dist.data.errors import DataError
from rmt_dist.data.tasks import SOT, TASKS, CharVocab, Task

_GENERATION_ORDER = ("test", "valid", "train")  # held-out splits claim their sources first


@dataclass(frozen=True)
class TaskSplits:
    task: str
    train: datasets.Dataset  # columns input_ids, labels: int8 [sample_len]
    valid: datasets.Dataset
    test: datasets.Dataset
    vocab: CharVocab
    vocab_size: int
    sample_len: int
    path: Path  # the cache entry
    cached: bool  # True when an earlier run (or another worker) had generated it already


def split_sizes(cfg: DataConfig, task: Task) -> dict[str, int]:
    """``data.num_*``, where 0 means the paper's size for the task."""
    given = (cfg.num_train, cfg.num_valid, cfg.num_test)
    return {split: n or paper for split, n, paper in zip(SPLITS, given, task.paper_sizes)}


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _rows(task: Task, length: int, count: int, rng: np.random.Generator, seen: set[bytes]) -> list[tuple[str, str]]:
    """``count`` samples whose sources are not in ``seen`` (which they join)."""
    rows: list[tuple[str, str]] = []
    budget = 10 * count + 1000
    while len(rows) < count:
        budget -= 1
        if budget < 0:
            raise DataError(f"data: could not draw {count} distinct {task.name} samples with "
                            f"data.task_length={length}; ask for fewer (data.num_train/num_valid/num_test)")
        source, target = task.sample(rng, length, len(rows))
        key = hashlib.blake2b(source.encode(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            rows.append((source, target))
    return rows


def _fixed_rows(array: np.ndarray) -> pa.Array:
    """[N, L] -> Arrow fixed-size lists, built directly (``from_dict`` of a 2-D array is ~100x slower)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def _to_dataset(rows: list[tuple[str, str]], vocab: CharVocab, sample_len: int) -> datasets.Dataset:
    input_ids = np.zeros((len(rows), sample_len), np.int8)  # 0 = pad
    labels = np.full((len(rows), sample_len), IGNORE_INDEX, np.int8)
    for i, (source, target) in enumerate(rows):
        ids = vocab.encode(source + SOT + target)
        n, s = len(ids) - 1, len(source)
        input_ids[i, :n] = ids[:-1]
        labels[i, s:n] = ids[s + 1:]  # the SOT position predicts the first target token
    column = datasets.List(datasets.Value("int8"), length=sample_len)
    return datasets.Dataset.from_dict({"input_ids": _fixed_rows(input_ids), "labels": _fixed_rows(labels)},
                                      features=datasets.Features({"input_ids": column, "labels": column}))


def _generate(task: Task, length: int, sizes: dict[str, int], seed: int, sample_len: int, out: Path) -> None:
    seen: set[bytes] = set()
    with _quiet_datasets():
        for index, split in enumerate(_GENERATION_ORDER):
            rng = np.random.default_rng([seed, zlib.crc32(task.name.encode()), index])
            rows = _rows(task, length, sizes[split], rng, seen)
            rows = [rows[i] for i in rng.permutation(len(rows))]  # spread quadratic's every-5th kind
            _to_dataset(rows, task.vocab, sample_len).save_to_disk(str(out / split))
    (out / "meta.json").write_text(json.dumps({"task": task.name, "task_length": length, "sizes": sizes,
                                               "seed": seed, "sample_len": sample_len,
                                               "symbols": task.vocab.symbols}))


def load_task_splits(data_cfg: DataConfig) -> TaskSplits:
    """Train/valid/test of ``data.task``, generated on first use and cached (safe from several processes).

    Raises DataError (one line) for an unknown task, a sample longer than ``segment_len x num_segments``
    or more samples than the task has distinct ones.
    """
    d = data_cfg
    if d.task not in TASKS:
        raise DataError(f"data.task must be one of {', '.join(TASKS)}, got {d.task!r}")
    task = TASKS[d.task]
    if task.max_length is not None and d.task_length > task.max_length:
        raise DataError(f"data.task_length must be <= {task.max_length} for data.task={d.task}, got {d.task_length}")
    sizes = split_sizes(d, task)
    sample_len = d.segment_len * d.num_segments
    source, target = task.sample(np.random.default_rng(0), d.task_length, 0)
    needed = len(source) + len(target)  # every sample of a task and length has the same size
    if needed > sample_len:
        raise DataError(f"data: a {d.task} sample with data.task_length={d.task_length} has {needed} tokens, more "
                        f"than data.segment_len x data.num_segments = {d.segment_len} x {d.num_segments} = {sample_len}")
    if sum(sizes.values()) > task.distinct(d.task_length):
        raise DataError(f"data: {d.task} with data.task_length={d.task_length} has only {task.distinct(d.task_length)} "
                        f"distinct samples, fewer than the {sum(sizes.values())} asked for "
                        f"(data.num_train + num_valid + num_test)")
    key = entry_key(task=d.task, task_length=d.task_length, sizes=sizes, seed=d.seed, sample_len=sample_len)
    entry = cache_root(d.cache_dir) / "tasks" / f"{d.task}-{d.task_length}-{key}"
    built = build_once(entry, lambda tmp: _generate(task, d.task_length, sizes, d.seed, sample_len, tmp))
    train, valid, test = (datasets.load_from_disk(str(entry / split)) for split in SPLITS)
    return TaskSplits(task=d.task, train=train, valid=valid, test=test, vocab=task.vocab, vocab_size=task.vocab.size,
                      sample_len=sample_len, path=entry, cached=not built)


def num_task_batches(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    per_step = batch_size * world_size
    return num_samples // per_step if drop_last else -(-num_samples // per_step)


def task_batches(dataset: datasets.Dataset, batch_size: int, world_size: int, rank: int, epoch: int = 0,
                 shuffle: bool = True, *, seed: int = 0, start_batch: int = 0,
                 drop_last: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(input_ids, labels)`` batches, LongTensors [batch_size, sample_len], for one epoch.

    Every step takes ``batch_size x world_size`` consecutive samples of the epoch's order (a
    permutation seeded by ``(seed, epoch)`` when shuffling, the stored order otherwise) and rank ``r``
    gets the r-th ``batch_size`` of them. ``drop_last`` (default: when shuffling) drops the incomplete
    last step; otherwise it is filled with rows of padding whose labels are all -100, so evaluation sees
    every sample once and every rank runs the same number of equal-shape batches. ``start_batch``
    resumes inside an epoch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    drop_last = shuffle if drop_last is None else drop_last
    n = len(dataset)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    sample_len = dataset.features["input_ids"].length
    rows = dataset.with_format("numpy")
    per_step = batch_size * world_size
    for step in range(start_batch, num_task_batches(n, batch_size, world_size, drop_last)):
        index = order[step * per_step + rank * batch_size:step * per_step + (rank + 1) * batch_size]
        input_ids = np.zeros((batch_size, sample_len), np.int64)
        labels = np.full((batch_size, sample_len), IGNORE_INDEX, np.int64)
        if len(index):
            got = rows[index]
            input_ids[:len(index)], labels[:len(index)] = got["input_ids"], got["labels"]
        yield torch.from_numpy(input_ids), torch.from_numpy(labels)
