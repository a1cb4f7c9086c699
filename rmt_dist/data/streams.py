"""Language-model streams in the Transformer-XL way, split across data-parallel ranks.

The token array is cut into ``S = batch_size x world_size`` contiguous streams of ``n`` tokens each
(``n = (len - 1) // S``; stream ``s`` holds inputs ``tokens[s*n : (s+1)*n]`` and labels shifted by one,
so the streams together predict every token once). Rank ``r`` owns streams ``r*B .. r*B+B-1``, its
batch rows. A window is ``num_segments`` consecutive segments of ``segment_len`` tokens of every row;
windows are read in order, so memory carried from one window to the next continues the same text.

Training reads full windows only (fixed shapes) and starts over at the next epoch; ``position`` is a
small JSON-able dict, and ``seek(position)`` continues exactly where a saved run stopped. Evaluation
reads ``epoch_windows()``: one pass to the end, the last window shorter.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from rmt_dist.constants import Segment
from rmt_dist.data.errors import DataError


class LMStreams:
    def __init__(self, tokens: np.ndarray, batch_size: int, world_size: int, rank: int, segment_len: int,
                 num_segments: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens = tokens
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.segment_len, self.num_segments = segment_len, num_segments
        self.num_streams = batch_size * world_size
        self.window_len = segment_len * num_segments
        self.stream_len = max(len(tokens) - 1, 0) // self.num_streams
        self.num_windows = self.stream_len // self.window_len  # full windows per epoch
        if self.num_windows == 0:
            raise DataError(
                f"data: a split of {len(tokens)} tokens cannot give each of {self.num_streams} streams "
                f"(train.batch_size x workers) one window of data.segment_len x data.num_segments = "
                f"{self.window_len} tokens; it needs at least {self.num_streams * self.window_len + 1}")
        self._starts = (rank * batch_size + np.arange(batch_size)) * self.stream_len  # this rank's rows
        self.epoch, self.window = 0, 0  # the next window to read

    @property
    def position(self) -> dict[str, int]:
        """Where the next window starts; the layout fields let ``seek`` refuse a mismatched resume."""
        return {"epoch": self.epoch, "window": self.window, "num_streams": self.num_streams,
                "window_len": self.window_len, "stream_len": self.stream_len}

    def seek(self, position: dict[str, Any]) -> None:
        layout = ("num_streams", "window_len", "stream_len")
        saved = {key: position.get(key) for key in layout}
        if saved != {key: getattr(self, key) for key in layout}:
            raise DataError(f"data: cannot resume a stream position saved for {saved} with "
                            f"{ {key: getattr(self, key) for key in layout} } (train.batch_size x workers, "
                            f"data.segment_len x data.num_segments and the corpus must not change)")
        if not 0 <= position["window"] <= self.num_windows or position["epoch"] < 0:
            raise DataError(f"data: stream position {position} is outside an epoch of {self.num_windows} windows")
        self.epoch, self.window = int(position["epoch"]), int(position["window"])

    def _read(self, start: int, length: int) -> list[Segment]:
        """Segments covering ``length`` stream positions from ``start`` (the last one shorter if need be)."""
        rows = np.stack([self.tokens[s + start:s + start + length + 1] for s in self._starts])
        rows = torch.from_numpy(rows.astype(np.int64))
        segments = []
        for start in range(0, length, self.segment_len):
            end = min(start + self.segment_len, length)
            segments.append((rows[:, start:end].contiguous(), rows[:, start + 1:end + 1].contiguous()))
        return segments

    def __iter__(self) -> Iterator[list[Segment]]:
        """Full windows from ``position`` on, epoch after epoch (never ends)."""
        while True:
            if self.window == self.num_windows:
                self.epoch, self.window = self.epoch + 1, 0
            index = self.window
            self.window += 1
            yield self._read(index * self.window_len, self.window_len)

    def epoch_windows(self) -> Iterator[list[Segment]]:
        """One pass over the whole split from its start, the last window holding what is left (evaluation)."""
        for start in range(0, self.stream_len, self.window_len):
            yield self._read(start, min(self.window_len, self.stream_len - start))
