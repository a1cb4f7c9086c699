"""The recurrence over segments: the loop against a manual unroll, how far gradients reach in each
BPTT mode (measured, not assumed), replay backprop against full BPTT, and streams across steps.

Reach is measured with a zero "probe" added to each segment's input embeddings (a forward hook on
``backbone.embed``): the gradient of a loss w.r.t. probe i says whether that loss reaches segment i,
however many times the recurrence re-runs it. Tiny float64 models on CPU."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from rmt_dist.config import Config
from rmt_dist.model import (IGNORE_INDEX, MemoryModel, MemoryState, StreamState, build_model, forward_segments,
                            split_segments, stream_train_step, train_segments)

KINDS = ("none", "memtr", "xl", "rmt", "rmt_xl", "infinite")
VOCAB, B, L, D = 23, 2, 4, 32


def tiny(kind: str, m: int = 3, xl_len: int = 6, dropout: float = 0.0, seed: int = 0) -> MemoryModel:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = D, 2, 4, 64
    cfg.model.dropout = dropout
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.xl_len = kind, m, xl_len
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB).double()


def make_segments(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n segments with pairwise different ids (so a probe can tell them apart) and some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, n * L), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[0, 1] = IGNORE_INDEX
    segments = split_segments(ids, labels, L)
    assert len({tuple(s[0].flatten().tolist()) for s in segments}) == n
    return segments


class Probes:
    """A zero leaf per segment added to that segment's embeddings every time the segment is run."""

    def __init__(self, model: MemoryModel, segments: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.ids = [s[0] for s in segments]
        self.leaves = [torch.zeros(B, L, D, dtype=torch.float64, requires_grad=True) for _ in segments]
        self.handle = model.backbone.embed.register_forward_hook(self._hook)
        self.reaches: list[list[bool]] = []  # one entry per call of ``backward``

    def index(self, ids: torch.Tensor) -> int:
        matches = [i for i, known in enumerate(self.ids) if known.shape == ids.shape and torch.equal(known, ids)]
        assert len(matches) == 1
        return matches[0]

    def _hook(self, module, args, out):
        return out + self.leaves[self.index(args[0])]

    def grads(self) -> list[torch.Tensor]:
        return [torch.zeros(B, L, D, dtype=torch.float64) if p.grad is None else p.grad.clone() for p in self.leaves]

    def reach(self, before: list[torch.Tensor]) -> list[bool]:
        """For each segment, whether the gradient added since ``before`` is non-zero (exactly zero = no reach)."""
        return [bool((after - b).abs().max() > 0) for after, b in zip(self.grads(), before)]

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, recording which segments this call's gradient reached."""
        before = self.grads()
        loss.backward()
        self.reaches.append(self.reach(before))


def grads_of(model: MemoryModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the loop against a manual unroll -------------------------------------------------------------

def manual_unroll(model: MemoryModel, segments, state: MemoryState | None = None):
    state = model.init_state() if state is None else state
    outputs = []
    for ids, labels in segments:
        out = model(ids, labels, state)
        outputs.append(out)
        state = out.state
    return outputs, state


def assert_same_state(a: MemoryState, b: MemoryState) -> None:
    assert (a.memory is None) == (b.memory is None) and (a.xl is None) == (b.xl is None)
    if a.memory is not None:
        torch.testing.assert_close(a.memory, b.memory, rtol=0, atol=1e-12)
    for x, y in zip(a.xl or (), b.xl or ()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_segment_loop_equals_manual_unroll(kind: str) -> None:
    model = tiny(kind)
    segments = make_segments(4)
    ref, ref_state = manual_unroll(model, segments)
    (sum(o.loss_sum for o in ref) / sum(o.n_tokens for o in ref)).backward()
    ref_grads = grads_of(model)
    model.zero_grad()

    outputs, state = forward_segments(model, segments)
    for o, r in zip(outputs, ref):
        torch.testing.assert_close(o.logits, r.logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(o.loss_sum, r.loss_sum, rtol=0, atol=1e-12)
        assert_same_state(o.state, r.state)
    assert_same_state(state, ref_state)

    total = sum(o.loss_sum.item() for o in ref)
    n = sum(int(o.n_tokens) for o in ref)
    for mode, k, replay in (("window", -1, False), ("window", 1, False), ("sliding", 1, False), ("window", -1, True)):
        model.zero_grad()
        stats = train_segments(model, segments, bptt_unroll=k, bptt_mode=mode, replay=replay)
        assert stats.n_tokens == n
        assert float(stats.loss_sum) == pytest.approx(total, rel=1e-12), (mode, k, replay)
        assert_same_state(stats.state, ref_state.detach())
        assert not any(t.requires_grad for t in stats.state.tensors())
        if k == -1:  # full BPTT: the gradient of the window's mean token loss
            for name, g in grads_of(model).items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=f"{mode} {replay} {name}")


@pytest.mark.parametrize("kind", ("rmt", "rmt_xl"))
def test_replay_runs_the_same_forward_as_the_loop(kind: str) -> None:
    """Each segment recomputed by replay has the loop's logits and the loop's incoming state (XL cache too)."""
    model = tiny(kind, dropout=0.2)
    segments = make_segments(4)
    torch.manual_seed(5)
    ref, _ = forward_segments(model, segments)
    seen: list = []
    def record(module, args, out) -> None:
        if out.logits is not None and out.logits.requires_grad:  # the replayed segments, not the no-grad pass
            seen.append((args[2], out))

    handle = model.register_forward_hook(record)
    torch.manual_seed(5)
    train_segments(model, segments, bptt_unroll=-1, replay=True)
    handle.remove()
    assert len(seen) == len(segments)
    for (state_in, out), t in zip(seen, reversed(range(len(segments)))):
        torch.testing.assert_close(out.logits, ref[t].logits, rtol=0, atol=1e-12, msg=f"segment {t}")
        if t:
            assert_same_state(state_in, ref[t - 1].state)


@pytest.mark.parametrize("kind", ("rmt", "rmt_xl"))
def test_unroll_covering_the_window_gives_full_bptt_gradients_with_dropout(kind: str) -> None:
    """Sliding re-runs and window chunks replay the same dropout masks as one plain forward."""
    model = tiny(kind, dropout=0.2)
    segments = make_segments(4)
    torch.manual_seed(3)
    full = train_segments(model, segments, bptt_unroll=-1, bptt_mode="window")
    full_grads = grads_of(model)
    torch.manual_seed(3)
    ref, _ = forward_segments(model, segments)
    assert float(full.loss_sum) == pytest.approx(sum(o.loss_sum.item() for o in ref), rel=1e-12)
    for mode, k in (("sliding", 3), ("sliding", 7), ("window", 3)):
        model.zero_grad()
        torch.manual_seed(3)
        stats = train_segments(model, segments, bptt_unroll=k, bptt_mode=mode)
        assert float(stats.loss_sum) == pytest.approx(float(full.loss_sum), rel=1e-12), (mode, k)
        assert_same_state(stats.state, full.state)
        for name, g in grads_of(model).items():
            torch.testing.assert_close(g, full_grads[name], rtol=1e-9, atol=1e-12, msg=f"{mode} {k} {name}")


@pytest.mark.parametrize("mode,k", [("sliding", 1), ("window", 1), ("sliding", 0)])
def test_truncated_bptt_runs_the_same_forward_with_dropout(mode: str, k: int) -> None:
    model = tiny("rmt_xl", dropout=0.2)
    segments = make_segments(4)
    torch.manual_seed(3)
    ref, ref_state = forward_segments(model, segments)
    torch.manual_seed(3)
    stats = train_segments(model, segments, bptt_unroll=k, bptt_mode=mode)
    assert float(stats.loss_sum) == pytest.approx(sum(o.loss_sum.item() for o in ref), rel=1e-12)
    assert_same_state(stats.state, ref_state.detach())


# ---- how far gradients reach ------------------------------------------------------------------------

def run_with_probes(model, segments, **kw) -> list[list[bool]]:
    """The reach of each backward call the recurrence makes."""
    probes = Probes(model, segments)
    train_segments(model, segments, backward=probes.backward, **kw)
    probes.handle.remove()
    return probes.reaches


@pytest.mark.parametrize("kind", ("rmt", "rmt_xl"))
@pytest.mark.parametrize("k", (0, 1, 2))
def test_sliding_gradient_stops_exactly_k_segments_back(kind: str, k: int) -> None:
    model = tiny(kind)
    n = 5
    reaches = run_with_probes(model, make_segments(n), bptt_unroll=k, bptt_mode="sliding")
    assert len(reaches) == n  # one backward per segment's loss
    for j, reach in enumerate(reaches):
        expected = [max(0, j - k) <= i <= j for i in range(n)]
        assert reach == expected, f"segment {j}'s loss reaches {reach}, expected {expected}"


@pytest.mark.parametrize("k", (0, 1, 2))
def test_window_gradient_reaches_back_to_the_window_start(k: int) -> None:
    """Per segment j (not per backward call): j's own loss reaches its window's start and no further."""
    model = tiny("rmt")
    n = 5
    segments = make_segments(n)
    probes = Probes(model, segments)
    per_segment: list[list[bool]] = []
    outputs: list = []
    handle = model.register_forward_hook(lambda mod, args, out: outputs.append(out))

    def backward(loss: torch.Tensor) -> None:
        for out in outputs:
            grads = torch.autograd.grad(out.loss_sum, probes.leaves, retain_graph=True, allow_unused=True)
            per_segment.append([g is not None and bool(g.abs().max() > 0) for g in grads])
        outputs.clear()
        loss.backward()

    stats = train_segments(model, segments, bptt_unroll=k, bptt_mode="window", backward=backward)
    handle.remove()
    assert len(per_segment) == n and stats.n_tokens > 0
    for j, reach in enumerate(per_segment):
        start = j - j % (k + 1)
        assert reach == [start <= i <= j for i in range(n)], (j, reach)


@pytest.mark.parametrize("kind", ("rmt", "rmt_xl"))
def test_full_bptt_reaches_the_first_segment(kind: str) -> None:
    model = tiny(kind)
    reaches = run_with_probes(model, make_segments(4), bptt_unroll=-1, bptt_mode="sliding")
    assert reaches == [[True] * 4]


def test_xl_cache_is_stop_gradient() -> None:
    """Transformer-XL: the cache carries values, never gradients, whatever the unroll."""
    model = tiny("xl")
    reaches = run_with_probes(model, make_segments(3), bptt_unroll=-1, bptt_mode="window")
    assert reaches == [[True, True, True]]  # one backward; each segment reaches only itself:
    probes = Probes(model, segments := make_segments(3))
    outputs, _ = forward_segments(model, segments)
    grads = torch.autograd.grad(outputs[2].loss_sum, probes.leaves, allow_unused=True)
    assert [g is not None and bool(g.abs().max() > 0) for g in grads] == [False, False, True]


# ---- replay backprop -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,dropout", [("rmt", 0.0), ("rmt", 0.2), ("rmt_xl", 0.0), ("rmt_xl", 0.2), ("xl", 0.2),
                                          ("memtr", 0.2), ("infinite", 0.0), ("infinite", 0.2)])
def test_replay_backprop_gives_full_bptt_gradients(kind: str, dropout: float) -> None:
    model = tiny(kind, dropout=dropout)
    segments = make_segments(4)
    calls = []
    torch.manual_seed(3)
    full = train_segments(model, segments, bptt_unroll=-1, bptt_mode="window")
    full_grads = grads_of(model)
    model.zero_grad()
    torch.manual_seed(3)
    replay = train_segments(model, segments, bptt_unroll=-1, replay=True,
                            backward=lambda loss: (calls.append(1), loss.backward()))
    assert len(calls) == len(segments)  # one backward per segment (the engine counts them)
    assert float(replay.loss_sum) == pytest.approx(float(full.loss_sum), rel=1e-12)
    replay_grads = grads_of(model)
    assert replay_grads.keys() == full_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, g in full_grads.items():
        torch.testing.assert_close(replay_grads[name], g, rtol=1e-9, atol=1e-12, msg=name)
    if dropout:  # the reference really used dropout: another seed gives other gradients
        model.zero_grad()
        torch.manual_seed(4)
        train_segments(model, segments, bptt_unroll=-1, bptt_mode="window")
        assert not torch.allclose(grads_of(model)["backbone.head.weight"], full_grads["backbone.head.weight"])


def test_replay_leaves_the_callers_rng_as_a_plain_forward_does() -> None:
    model = tiny("rmt", dropout=0.2)
    segments = make_segments(3)
    torch.manual_seed(7)
    train_segments(model, segments, bptt_unroll=-1, bptt_mode="window")
    after_full = torch.rand(3)
    torch.manual_seed(7)
    train_segments(model, segments, bptt_unroll=-1, replay=True)
    assert torch.equal(torch.rand(3), after_full)


def test_replay_requires_full_bptt() -> None:
    with pytest.raises(ValueError, match="bptt_unroll must be -1"):
        train_segments(tiny("rmt"), make_segments(2), bptt_unroll=1, replay=True)


# ---- streams across steps --------------------------------------------------------------------------

@pytest.mark.parametrize("k", (1, 2))
def test_stream_sliding_reaches_k_segments_into_the_previous_step(k: int) -> None:
    model = tiny("rmt")
    per_step, n = 3, 6
    segments = make_segments(n)
    probes = Probes(model, segments)
    stream = StreamState()
    states = []
    for step in range(n // per_step):
        stats, stream = stream_train_step(model, stream, segments[step * per_step:(step + 1) * per_step],
                                          bptt_unroll=k, bptt_mode="sliding", backward=probes.backward)
        states.append(stats.state)
        assert len(stream.history) == k
    probes.handle.remove()
    assert len(probes.reaches) == n
    for j, reach in enumerate(probes.reaches):
        assert reach == [max(0, j - k) <= i <= j for i in range(n)], (j, reach)
    # The memory carried across steps is the same as one uninterrupted pass.
    _, ref_state = forward_segments(model, segments)
    torch.testing.assert_close(states[-1].memory, ref_state.memory, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,k", [("window", 1), ("window", -1), ("sliding", 0)])
def test_stream_without_history_carries_detached_memory(mode: str, k: int) -> None:
    model = tiny("rmt")
    segments = make_segments(4)
    probes = Probes(model, segments)
    stream = StreamState()
    for step in range(2):
        stats, stream = stream_train_step(model, stream, segments[2 * step:2 * step + 2], bptt_unroll=k,
                                          bptt_mode=mode, backward=probes.backward)
        assert stream.history == [] and stream.state.memory is not None and not stream.state.memory.requires_grad
    probes.handle.remove()
    reaches = probes.reaches
    assert not any(reach[:2] != [False, False] for reach in reaches[len(reaches) // 2:])  # step 2 never reaches step 1
    _, ref_state = forward_segments(model, segments)
    torch.testing.assert_close(stream.state.memory, ref_state.memory, rtol=0, atol=1e-12)


# ---- cost: what the recurrence runs --------------------------------------------------------------

@pytest.mark.parametrize("kind", ("none", "memtr", "xl", "infinite"))
def test_kinds_without_gradient_memory_get_full_bptt_gradients_in_every_mode(kind: str) -> None:
    """No gradient crosses segments (xl's cache is stop-gradient), so every mode is the same training
    signal, and sliding BPTT runs each segment once instead of re-running k earlier ones."""
    model = tiny(kind, dropout=0.2)
    segments = make_segments(4)
    torch.manual_seed(3)
    full = train_segments(model, segments, bptt_unroll=-1, bptt_mode="window")
    full_grads = grads_of(model)
    runs = []
    handle = model.register_forward_hook(lambda mod, args, out: runs.append(1))
    for mode, k in (("sliding", 2), ("sliding", 0), ("window", 1)):
        model.zero_grad()
        runs.clear()
        torch.manual_seed(3)
        stats = train_segments(model, segments, bptt_unroll=k, bptt_mode=mode)
        assert len(runs) == len(segments), (mode, k)
        assert float(stats.loss_sum) == pytest.approx(float(full.loss_sum), rel=1e-12)
        for name, g in grads_of(model).items():
            torch.testing.assert_close(g, full_grads[name], rtol=1e-9, atol=1e-12, msg=f"{mode} {k} {name}")
    handle.remove()


def test_sliding_runs_the_lm_head_only_for_the_loss_it_backpropagates() -> None:
    model = tiny("rmt")
    heads = []
    model.backbone.head.register_forward_hook(lambda mod, args, out: heads.append(out.requires_grad))
    n, k = 5, 2
    train_segments(model, make_segments(n), bptt_unroll=k, bptt_mode="sliding")
    assert heads == [True] * n
    heads.clear()
    train_segments(model, make_segments(n), bptt_unroll=-1, replay=True)
    assert heads == [True] * n


@pytest.mark.parametrize("kind", ("rmt", "xl", "none"))
@pytest.mark.parametrize("mode,k,replay", [("sliding", 2, False), ("sliding", 0, False), ("sliding", -1, False),
                                           ("window", 1, False), ("window", 2, False), ("window", -1, False),
                                           ("window", -1, True)])
def test_backward_calls_match_the_engines_accumulation_count(kind: str, mode: str, k: int, replay: bool) -> None:
    """DeepSpeed steps after ``backward_calls_per_step`` backward calls: the recurrence must make exactly
    that many per training step, in train_segments and in streams."""
    from rmt_dist.train.engine import backward_calls_per_step

    n = 5
    cfg = Config()
    cfg.memory.kind, cfg.memory.bptt_unroll, cfg.memory.bptt_mode, cfg.memory.replay_backprop = kind, k, mode, replay
    cfg.data.num_segments = n
    expected = backward_calls_per_step(cfg)
    model = tiny(kind)
    segments = make_segments(2 * n)
    calls = []
    train_segments(model, segments[:n], bptt_unroll=k, bptt_mode=mode, replay=replay,
                   backward=lambda loss: (calls.append(1), loss.backward()))
    assert len(calls) == expected
    stream = StreamState()
    for step in range(2):
        calls.clear()
        _, stream = stream_train_step(model, stream, segments[step * n:(step + 1) * n], bptt_unroll=k, bptt_mode=mode,
                                      replay=replay, backward=lambda loss: (calls.append(1), loss.backward()))
        assert len(calls) == expected, step


def test_aux_loss_adds_the_weighted_memory_prediction_of_the_extra_class() -> None:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = D, 2, 4, 64
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.xl_len, cfg.memory.aux_loss_weight = "rmt_xl", 3, 6, 0.01
    model = build_model(cfg, VOCAB).double()
    assert model.backbone.head.out_features == VOCAB + 1
    ids, labels = make_segments(1)[0]
    out = model(ids, labels, model.init_state())
    assert out.logits.shape == (B, L, VOCAB)
    token_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    aux_logits = model.backbone.logits(out.state.memory)
    aux = torch.nn.functional.cross_entropy(aux_logits.reshape(-1, VOCAB + 1), torch.full((B * 3,), VOCAB))
    torch.testing.assert_close(out.loss_sum, token_loss + 0.01 * aux * out.n_tokens, rtol=1e-12, atol=1e-12)
