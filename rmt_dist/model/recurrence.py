"""The recurrence over segments: forward, BPTT modes and memory-replay backprop.

``model`` is a MemoryModel or a DeepSpeed engine wrapping one: it is called (``model(ids, labels,
state)``), never unwrapped to its module, so the engine's forward bookkeeping runs (ZeRO-3 accumulates
gradients across backward calls only then). A ``Segment`` is ``(input_ids, labels)``, both [B, L],
labels already aligned (IGNORE_INDEX = no loss). Training functions take a ``backward`` callable
(``Tensor.backward`` in plain PyTorch, ``engine.backward`` under DeepSpeed; it must not rescale the
loss) and call it one or more times;
gradients accumulate, and every loss handed to it is already divided by the window's labelled-token
count, so the accumulated gradient is that of the window's mean token loss.

BPTT (``bptt_unroll`` = k):
- ``window``: the new segments are cut into chunks of k+1; memory is detached between chunks, so a
  segment's loss reaches back to its chunk's start (at most k segments).
- ``sliding``: every segment j's loss reaches exactly k previous segments: the memory before
  segment j-k is computed without a graph, then segments j-k..j are re-run with one (j-k..j-1 without
  the LM head: only their memory is needed). Streams keep the last k segments as ``history`` so this
  holds across steps too. Where no gradient crosses segments (none, memtr, xl: its cache is
  stop-gradient) every k is the same signal, so each segment runs once (as window with k=0).
- Backward calls per step (DeepSpeed's accumulation count, ``train/engine.py``): one per segment
  for sliding and replay, one per chunk for window, one for full BPTT.
- k = -1: full BPTT over the window (one chunk); with ``replay`` the same gradients at constant
  activation memory: a no-grad forward stores the state before each segment, then segments are
  recomputed last to first, each backward seeded with the gradient of the state it produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from rmt_dist.constants import IGNORE_INDEX, Segment
from rmt_dist.model.memory import MemoryModel, MemoryState, SegmentOutput

Backward = Callable[[Tensor], None]


def split_segments(input_ids: Tensor, labels: Tensor, segment_len: int) -> list[Segment]:
    """[B, K * L] sample tensors -> K segments of [B, L] (the last may be shorter)."""
    return [
        (input_ids[:, i:i + segment_len], labels[:, i:i + segment_len])
        for i in range(0, input_ids.shape[1], segment_len)
    ]


def forward_segments(model: MemoryModel, segments: Sequence[Segment],
                     state: MemoryState | None = None) -> tuple[list[SegmentOutput], MemoryState]:
    """Run the segments in order in one graph (full BPTT if the caller backpropagates)."""
    state = model.init_state() if state is None else state
    outputs = []
    for input_ids, labels in segments:
        out = model(input_ids, labels, state)
        outputs.append(out)
        state = out.state
    return outputs, state


def _state_after(model: MemoryModel, segments: Sequence[Segment], state: MemoryState) -> MemoryState:
    """The state after ``segments`` from ``state``, without the LM head (in the caller's grad mode)."""
    for input_ids, labels in segments:
        state = model(input_ids, labels, state, with_logits=False).state
    return state


@dataclass
class StepStats:
    """A step's figures as device tensors: reading them (``float(stats.loss_sum)``) waits for the device,
    so the caller does it once per step, not the recurrence once per segment."""

    loss_sum: Tensor  # scalar: summed token loss over the new segments (detached)
    n_tokens: Tensor  # scalar long: their labelled tokens
    state: MemoryState  # detached state after the last segment


@dataclass
class StreamState:
    """A stream's recurrent state between steps: the memory before ``history`` and, for sliding
    BPTT, the last k segments (re-run as context so the next segments' losses reach them)."""

    state: MemoryState = field(default_factory=MemoryState)
    history: list[Segment] = field(default_factory=list)

    def to(self, device: torch.device) -> "StreamState":
        return StreamState(state=self.state.map(lambda t: t.to(device)),
                           history=[(ids.to(device), labels.to(device)) for ids, labels in self.history])

    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists and dicts (``torch.load(weights_only=True)`` reads them back), on their devices."""
        return {"state": self.state.state_dict(), "history": [list(segment) for segment in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = MemoryState()
        self.state.load_state_dict(state["state"])
        self.history = [tuple(segment) for segment in state["history"]]


def _labelled(segments: Sequence[Segment]) -> Tensor:
    """Labelled tokens of the segments: a scalar on their device (no host sync)."""
    return torch.stack([(labels != IGNORE_INDEX).sum() for _, labels in segments]).sum()


RngState = tuple[Tensor, Tensor | None]


def _get_rng() -> RngState:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


@contextlib.contextmanager
def _replaying_rng(saved: RngState) -> Iterator[None]:
    """Re-run code with the RNG (dropout) as it was, leaving the caller's RNG untouched."""
    devices = [torch.cuda.current_device()] if saved[1] is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1])
        yield


def _no_grad_states(model: MemoryModel, segments: Sequence[Segment], state: MemoryState,
                    ) -> tuple[list[MemoryState], list[RngState]]:
    """States before each segment and after the last (len + 1), and the RNG state before each segment."""
    states, rng = [state.detach()], []
    with torch.no_grad():
        for segment in segments:
            rng.append(_get_rng())
            states.append(_state_after(model, [segment], states[-1]).detach())
    return states, rng


def _window_backward(model: MemoryModel, segments: Sequence[Segment], state: MemoryState, k: int,
                     backward: Backward, normalizer: Tensor) -> tuple[Tensor, MemoryState]:
    chunk = len(segments) if k < 0 else k + 1
    total = normalizer.new_zeros((), dtype=torch.float64)
    state = state.detach()
    for start in range(0, len(segments), chunk):
        outputs, state = forward_segments(model, segments[start:start + chunk], state)
        loss = torch.stack([o.loss_sum for o in outputs]).sum()
        backward(loss / normalizer)
        total = total + loss.detach()
        state = state.detach()
    return total, state


def _sliding_backward(model: MemoryModel, context: Sequence[Segment], segments: Sequence[Segment],
                      state: MemoryState, k: int, backward: Backward, normalizer: Tensor,
                      ) -> tuple[Tensor, list[MemoryState]]:
    """Returns the summed loss and the (no-grad) states before each of context + segments and after."""
    everything = list(context) + list(segments)
    states, rng = _no_grad_states(model, everything, state)
    total = normalizer.new_zeros((), dtype=torch.float64)
    for j in range(len(context), len(everything)):
        start = max(0, j - k)
        with _replaying_rng(rng[start]):
            before = _state_after(model, everything[start:j], states[start])  # re-run with a graph
            out = model(*everything[j], before)
        backward(out.loss_sum / normalizer)
        total = total + out.loss_sum.detach()
    return total, states


def _replay_backward(model: MemoryModel, segments: Sequence[Segment], state: MemoryState,
                     backward: Backward, normalizer: Tensor) -> tuple[Tensor, MemoryState]:
    states, rng = _no_grad_states(model, segments, state)
    total = normalizer.new_zeros((), dtype=torch.float64)
    grad_memory: Tensor | None = None
    for t in reversed(range(len(segments))):
        start = states[t]
        memory_in = None if start.memory is None else start.memory.detach().requires_grad_(True)
        with _replaying_rng(rng[t]):
            out = model(*segments[t], dataclasses.replace(start, memory=memory_in))
        objective = out.loss_sum / normalizer
        if grad_memory is not None and out.state.memory is not None:
            objective = objective + (out.state.memory * grad_memory).sum()
        backward(objective)
        total = total + out.loss_sum.detach()
        grad_memory = None if memory_in is None else memory_in.grad
    return total, states[-1]


def _sliding_reach(model: MemoryModel, k: int) -> int:
    """Segments a loss can reach back through memory: k, or 0 where no gradient crosses segments
    (none, memtr, and xl, whose cache is stop-gradient), so re-running earlier segments adds nothing.
    (A DeepSpeed engine hands attribute look-ups to its module.)"""
    return k if model.carries_gradient else 0


def train_segments(model: MemoryModel, segments: Sequence[Segment], state: MemoryState | None = None, *,
                   bptt_unroll: int, bptt_mode: str = "window", replay: bool = False,
                   backward: Backward = Tensor.backward) -> StepStats:
    """Forward and backward over ``segments`` from ``state``; gradients accumulate in the model."""
    state = model.init_state() if state is None else state
    n = _labelled(segments)
    if replay:
        if bptt_unroll != -1:
            raise ValueError("replay backprop is full BPTT: bptt_unroll must be -1")
        total, state = _replay_backward(model, segments, state, backward, n.clamp(min=1))
    elif bptt_mode == "sliding" and bptt_unroll >= 0 and _sliding_reach(model, bptt_unroll) > 0:
        total, states = _sliding_backward(model, [], segments, state, bptt_unroll, backward, n.clamp(min=1))
        state = states[-1]
    elif bptt_mode == "sliding" and bptt_unroll >= 0:  # reach 0 is a window of one: each segment runs once
        total, state = _window_backward(model, segments, state, 0, backward, n.clamp(min=1))
    else:
        total, state = _window_backward(model, segments, state, bptt_unroll, backward, n.clamp(min=1))
    return StepStats(loss_sum=total, n_tokens=n, state=state.detach())


def stream_train_step(model: MemoryModel, stream: StreamState, segments: Sequence[Segment], *,
                      bptt_unroll: int, bptt_mode: str, replay: bool = False,
                      backward: Backward = Tensor.backward) -> tuple[StepStats, StreamState]:
    """One LM training step on the next window of a stream; returns the stream's next state."""
    keeps_history = bptt_mode == "sliding" and not replay and _sliding_reach(model, bptt_unroll) > 0
    if not keeps_history:
        stats = train_segments(model, segments, stream.state, bptt_unroll=bptt_unroll, bptt_mode=bptt_mode,
                               replay=replay, backward=backward)
        return stats, StreamState(state=stats.state)
    n = _labelled(segments)
    total, states = _sliding_backward(model, stream.history, segments, stream.state, bptt_unroll, backward,
                                      n.clamp(min=1))
    everything = list(stream.history) + list(segments)
    first_kept = max(0, len(everything) - bptt_unroll)
    stats = StepStats(loss_sum=total, n_tokens=n, state=states[-1])
    return stats, StreamState(state=states[first_kept], history=everything[first_kept:])


@torch.no_grad()
def evaluate_segments(model: MemoryModel, segments: Sequence[Segment],
                      state: MemoryState | None = None) -> tuple[float, int, int, MemoryState]:
    """(loss_sum, labelled tokens, correctly predicted tokens, state after) with memory carried; the
    figures are read from the device once, after the last segment."""
    outputs, state = forward_segments(model, segments, state)
    loss = torch.stack([o.loss_sum.double() for o in outputs]).sum()
    n = torch.stack([o.n_tokens for o in outputs]).sum()
    correct = torch.stack([((o.logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
                           for o, (_, labels) in zip(outputs, segments)]).sum()
    loss, n, correct = torch.stack([loss, n.double(), correct.double()]).tolist()
    return loss, int(n), int(correct), state.detach()
