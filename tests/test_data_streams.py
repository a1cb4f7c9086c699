"""LM streams: coverage across ranks, order, labels, exact resume, epochs, and the too-short error."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from rmt_dist.data import DataError, LMStreams

B, WORLD, L, K = 2, 3, 5, 3
N = 1000  # tokens: 6 streams of 166, 11 full windows of 15 each, 1 left over


def corpus(n: int = N) -> np.ndarray:
    return np.arange(n, dtype=np.int32)  # token == its position, so coverage and order are visible


def rows_read(streams: LMStreams, windows) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels each row read, concatenated over ``windows``: [B, tokens]."""
    inputs = torch.cat([x for window in windows for x, _ in window], dim=1)
    labels = torch.cat([y for window in windows for _, y in window], dim=1)
    return inputs, labels


def test_streams_of_all_ranks_cover_the_split_once_in_order():
    tokens = corpus()
    per_rank = []
    for rank in range(WORLD):
        streams = LMStreams(tokens, B, WORLD, rank, L, K)
        windows = list(streams.epoch_windows())
        assert all(len(x) == len(y) for w in windows for x, y in w)
        assert [x.shape for x, _ in windows[0]] == [(B, L)] * K and windows[-1][-1][0].shape == (B, 166 % L)
        inputs, labels = rows_read(streams, windows)
        assert torch.equal(labels, inputs + 1)  # every label is the next token of the corpus
        per_rank.append(inputs)
    streams_in_order = torch.cat(per_rank).reshape(-1)  # rank 0's rows, then rank 1's, ...
    assert torch.equal(streams_in_order, torch.arange(B * WORLD * 166))  # once each, in order, no gaps
    assert (N - 1) - len(streams_in_order) < B * WORLD  # only the tail that does not split evenly is unread


def test_training_reads_full_windows_in_order_then_starts_the_next_epoch():
    streams = LMStreams(corpus(), B, WORLD, 1, L, K)
    assert streams.num_windows == 166 // (L * K) == 11
    it = iter(streams)
    first_epoch = [next(it) for _ in range(streams.num_windows)]
    inputs, _ = rows_read(streams, first_epoch)
    starts = (B + torch.arange(B)) * 166  # rank 1 owns streams 2 and 3
    assert torch.equal(inputs, starts[:, None] + torch.arange(11 * L * K))
    assert streams.position["epoch"] == 0 and streams.position["window"] == 11
    again = next(it)
    assert streams.epoch == 1 and streams.window == 1
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(again, first_epoch[0]))


@pytest.mark.parametrize("stop", [0, 4, 11, 17])
def test_resuming_at_a_saved_position_yields_exactly_the_uninterrupted_batches(stop):
    reader = iter(uninterrupted := LMStreams(corpus(), B, WORLD, 2, L, K))
    for _ in range(stop):
        next(reader)
    saved = json.loads(json.dumps(uninterrupted.position))  # as the checkpoint stores it
    expected = [next(reader) for _ in range(15)]  # crosses an epoch boundary
    resumed = LMStreams(corpus(), B, WORLD, 2, L, K)
    resumed.seek(saved)
    got = list(itertools.islice(resumed, 15))
    for want, have in zip(expected, got):
        for (x1, y1), (x2, y2) in zip(want, have):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert resumed.position == uninterrupted.position


def test_seek_refuses_a_position_saved_with_another_layout():
    saved = LMStreams(corpus(), B, WORLD, 0, L, K).position
    other = LMStreams(corpus(), B, WORLD - 1, 0, L, K)  # a run resumed on fewer workers
    with pytest.raises(DataError, match="cannot resume a stream position saved for"):
        other.seek(saved)


def test_evaluation_pass_ends_and_ignores_the_training_position():
    streams = LMStreams(corpus(), B, WORLD, 0, L, K)
    next(iter(streams))
    assert len(list(streams.epoch_windows())) == 12 and len(list(streams.epoch_windows())) == 12
    assert streams.window == 1


def test_split_shorter_than_one_window_is_one_clear_line():
    with pytest.raises(DataError) as err:
        LMStreams(corpus(90), B, WORLD, 0, L, K)
    assert str(err.value) == ("data: a split of 90 tokens cannot give each of 6 streams (train.batch_size x workers) "
                              "one window of data.segment_len x data.num_segments = 15 tokens; it needs at least 91")
    LMStreams(corpus(91), B, WORLD, 0, L, K)  # exactly enough
