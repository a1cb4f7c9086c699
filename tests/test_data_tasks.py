"""The paper's tasks: targets are what they claim, quadratic solutions are arithmetically right, held-out
samples never appear in train, the loss mask covers the target only, batches shard and resume exactly."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from rmt_dist.config import DataConfig
from rmt_dist.data import DataError, TaskSplits, load_task_splits, num_task_batches, task_batches
from rmt_dist.data.task_splits import IGNORE_INDEX
from rmt_dist.data.tasks import PAD, SOT, STEP, quadratic_real

SPLITS = ("train", "valid", "test")


def make_splits(cache: Path, task: str, length: int, seg: int, k: int, sizes=(1500, 200, 200), seed=0) -> TaskSplits:
    return load_task_splits(DataConfig(dataset="task", task=task, task_length=length, segment_len=seg, num_segments=k,
                                       num_train=sizes[0], num_valid=sizes[1], num_test=sizes[2], seed=seed,
                                       cache_dir=str(cache)))


def samples(splits: TaskSplits, split: str) -> list[tuple[str, str]]:
    """(source, target) texts of every row, read back from input_ids and labels."""
    data = getattr(splits, split).with_format("numpy")[:]
    out = []
    for ids, labels in zip(data["input_ids"], data["labels"]):
        scored = np.flatnonzero(labels != IGNORE_INDEX)
        start, end = scored[0], scored[-1] + 1
        assert np.array_equal(scored, np.arange(start, end))  # one contiguous target part
        assert ids[start] == splits.vocab.symbols.index(SOT)  # scored from the start-of-target token on
        assert np.array_equal(labels[start:end - 1], ids[start + 1:end])  # next-token labels
        assert not ids[end:].any()  # then padding only, unscored
        out.append((splits.vocab.decode(ids[:start]), splits.vocab.decode(labels[start:end])))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("task_cache")


@pytest.mark.parametrize("task, check", [
    ("copy", lambda s, t: t == s + s),
    ("reverse", lambda s, t: t == s[::-1]),
])
def test_copy_and_reverse_targets_are_what_they_claim(cache, task, check):
    splits = make_splits(cache, task, 24, 24, 3)
    assert splits.sample_len == 72 and splits.vocab_size == 28
    for split in SPLITS:
        for source, target in samples(splits, split):
            assert len(source) == 24 and source.isalpha() and check(source, target)


def test_associative_retrieval_answer_is_the_value_of_the_query_key(cache):
    splits = make_splits(cache, "assoc", 4, 6, 2)
    for split in SPLITS:
        for source, target in samples(splits, split):
            pairs, query = source.split("??")
            keys, values = pairs[0::2], pairs[1::2]
            assert len(keys) == 4 == len(set(keys)) and values.isdigit()
            assert target == values[keys.index(query)]


def test_sort_target_orders_symbols_by_frequency(cache):
    splits = make_splits(cache, "sort", 300, 64, 5, sizes=(200, 20, 20))
    for source, target in samples(splits, "train"):
        counts = Counter(source)
        assert len(source) == 300 and sorted(target) == sorted(set(target)) and len(target) == 20
        assert [counts[c] for c in target] == sorted((counts[c] for c in target), reverse=True)


def test_quadratic_format_is_the_papers():
    equation, steps, answer = quadratic_real(-4, 6, 92)
    assert equation == "-4*x^2+392*x-2208=0"
    assert ";".join(steps) == "x^2-98*x+552=0;D=98^2-4*1*552=7396=86^2;x=(98-86)/2=6;x=(98+86)/2=92"
    assert answer == "6,92"


def coefficients(poly: str) -> tuple[int, int, int]:
    """``a*x^2+b*x+c=0`` -> (a, b, c), insisting on the paper's spelling."""
    assert poly.endswith("=0")
    coef = {2: 0, 1: 0, 0: 0}
    powers = []
    for term in re.findall(r"[+-]?[^+-]+", poly[:-2]):
        sign, body = (-1 if term[0] == "-" else 1), term.lstrip("+-")
        power = 2 if body.endswith("x^2") else 1 if body.endswith("x") else 0
        number = body[:-3 if power == 2 else -1 if power else None].rstrip("*") if power else body
        assert number == "" or (number.isdigit() and number != "1" and body.count("*") == 1) or not power
        coef[power] = sign * int(number or 1)
        powers.append(power)
    assert powers == sorted(powers, reverse=True) and len(set(powers)) == len(powers) and coef[2]
    return coef[2], coef[1], coef[0]


def test_every_quadratic_solution_is_arithmetically_right(cache):
    splits = make_splits(cache, "quadratic", 1, 30, 6, sizes=(2000, 250, 250))
    assert splits.sample_len == 180
    d_step = re.compile(r"D=(\d+)\^2-4\*1\*(\(-\d+\)|\d+)=(-?\d+)(?:=(\d+)\^2|<0)")
    for split in SPLITS:
        rows = samples(splits, split)
        assert sum(target.endswith("none" + PAD * (STEP - 4)) for _, target in rows) == len(rows) // 5
        for source, target in rows:
            assert len(source) == STEP and len(target) == 5 * STEP
            blocks = [target[i:i + STEP] for i in range(0, 5 * STEP, STEP)]
            equation, *steps, answer = [b.rstrip(PAD) for b in [source, *blocks]]
            assert all(PAD not in s for s in (equation, *steps, answer))
            alpha, alpha_b, alpha_c = coefficients(equation)
            one, b, c = coefficients(steps[0])
            assert one == 1 and (alpha * b, alpha * c) == (alpha_b, alpha_c) and 1 <= abs(alpha) <= 10
            m = d_step.fullmatch(steps[1])
            assert m, steps[1]
            assert int(m[1]) == abs(b) and int(m[2].strip("()")) == c and int(m[3]) == b * b - 4 * c
            if answer == "none":
                assert b * b - 4 * c < 0 and m[4] is None and steps[2:] == ["", ""]
                continue
            s = int(m[4])
            assert s * s == b * b - 4 * c
            x1, x2 = (int(x) for x in answer.split(","))
            assert steps[2] == f"x=({-b}-{s})/2={x1}" and 2 * x1 == -b - s
            assert steps[3] == f"x=({-b}+{s})/2={x2}" and 2 * x2 == -b + s
            for x in (x1, x2):
                assert alpha * x * x + alpha_b * x + alpha_c == 0 and -100 <= x <= 100


def test_no_held_out_sample_appears_in_train_even_when_collisions_are_likely(cache):
    # 17,576 distinct sources for 10,000 samples: independent draws would repeat hundreds of them
    splits = make_splits(cache, "copy", 3, 3, 3, sizes=(8000, 1000, 1000))
    rows = {split: {r.tobytes() for r in getattr(splits, split).with_format("numpy")[:]["input_ids"]}
            for split in SPLITS}
    assert [len(rows[s]) for s in SPLITS] == [8000, 1000, 1000]  # no repeats inside a split either
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["valid"] and not rows["valid"] & rows["test"]


def test_generation_is_deterministic_by_seed_and_cached(cache, tmp_path):
    first = make_splits(cache, "reverse", 8, 8, 2)
    again = make_splits(cache, "reverse", 8, 8, 2)
    elsewhere = make_splits(tmp_path, "reverse", 8, 8, 2)
    reseeded = make_splits(tmp_path, "reverse", 8, 8, 2, seed=1)
    assert not first.cached and again.cached and not elsewhere.cached
    ids = lambda s: s.test.with_format("numpy")[:]["input_ids"]  # noqa: E731
    assert np.array_equal(ids(first), ids(elsewhere)) and not np.array_equal(ids(first), ids(reseeded))


def test_paper_sizes_are_the_default(tmp_path):
    splits = load_task_splits(DataConfig(dataset="task", task="quadratic", segment_len=30, num_segments=6,
                                         num_train=10, cache_dir=str(tmp_path)))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (10, 10_000, 20_000)


def sample_ids(splits: TaskSplits) -> dict[bytes, int]:
    return {r.tobytes(): i for i, r in enumerate(splits.train.with_format("numpy")[:]["input_ids"].astype(np.int64))}


def test_shuffled_batches_shard_one_permutation_across_ranks_and_resume(cache):
    splits = make_splits(cache, "copy", 6, 6, 3)  # 1500 train samples
    index = sample_ids(splits)
    world, batch = 3, 8
    steps = num_task_batches(1500, batch, world, drop_last=True)
    seen = []
    for rank in range(world):
        batches = list(task_batches(splits.train, batch, world, rank, epoch=2, shuffle=True))
        assert len(batches) == steps == 62
        assert all(x.shape == (batch, 18) and x.dtype == torch.int64 for x, _ in batches)
        seen.append([index[row.numpy().tobytes()] for x, _ in batches for row in x])
        resumed = list(task_batches(splits.train, batch, world, rank, epoch=2, shuffle=True, start_batch=40))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, batches[40:]))
        assert len(resumed) == steps - 40
    flat = [i for rank_ids in seen for i in rank_ids]
    assert len(flat) == len(set(flat)) == steps * world * batch  # no sample twice within an epoch
    other_epoch = next(task_batches(splits.train, batch, world, 0, epoch=3, shuffle=True))[0]
    assert not torch.equal(other_epoch, next(task_batches(splits.train, batch, world, 0, epoch=2))[0])


def test_evaluation_batches_see_every_sample_once_with_masked_filler_rows(cache):
    splits = make_splits(cache, "copy", 6, 6, 3)  # 200 valid samples
    world, batch = 3, 16  # 48 per step: 5 steps, the last one holds 8 samples
    rows, filler = [], 0
    for rank in range(world):
        batches = list(task_batches(splits.valid, batch, world, rank, shuffle=False))
        assert len(batches) == 5
        for x, y in batches:
            real = (y != IGNORE_INDEX).any(dim=1)
            filler += int((~real).sum())
            assert not x[~real].any()
            rows += [r.numpy().tobytes() for r in x[real]]
    valid = splits.valid.with_format("numpy")[:]["input_ids"].astype(np.int64)
    assert sorted(rows) == sorted(r.tobytes() for r in valid) and filler == 5 * 48 - 200


@pytest.mark.parametrize("overrides, message", [
    ({"task": "add"}, "data.task must be one of copy, reverse, assoc, quadratic, sort, retrieval_start, "
                       "retrieval_random, retrieval_two, got 'add'"),
    ({"task": "copy", "task_length": 24, "segment_len": 10, "num_segments": 3},
     "data: a copy sample with data.task_length=24 has 72 tokens, more than data.segment_len x data.num_segments "
     "= 10 x 3 = 30"),
    ({"task": "copy", "task_length": 2, "segment_len": 6, "num_segments": 1},
     "data: copy with data.task_length=2 has only 676 distinct samples, fewer than the 115000 asked for "
     "(data.num_train + num_valid + num_test)"),
    ({"task": "assoc", "task_length": 60, "segment_len": 200, "num_segments": 1},
     "data.task_length must be <= 52 for data.task=assoc, got 60"),
])
def test_bad_task_input_is_one_clear_line(tmp_path, overrides, message):
    with pytest.raises(DataError) as err:
        load_task_splits(DataConfig(dataset="task", cache_dir=str(tmp_path), **overrides))
    assert str(err.value) == message
    assert not (tmp_path / "tasks").exists()  # it failed before generating anything
