"""``train.compile``: every block compiled with ``torch.compile`` computes what the eager model does, through
the recurrence's no-grad and re-run passes, memory-replay backprop and activation checkpointing.

One tiny float64 model; compiled and eager losses and gradients agree to rtol 1e-9 (inductor reorders
float64 reductions: differences of a few ulp, not of precision). Compiling costs ~10-30 s per variant on
these cores, so the variants share compiled graphs: after the first training mode, the others hit the
cache (same shapes, same grad modes)."""

from __future__ import annotations

import torch

from rmt_dist.config import Config, validate
from rmt_dist.model import build_model, split_segments, train_segments

VOCAB, B, L, SEGMENTS = 23, 2, 6, 3


def tiny(compile_blocks: bool, recompute: str = "all") -> torch.nn.Module:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = 32, 2, 4, 64
    cfg.memory.kind, cfg.memory.num_tokens = "rmt", 2
    cfg.train.activation_checkpointing, cfg.train.recompute, cfg.train.compile = True, recompute, compile_blocks
    torch.manual_seed(0)
    return build_model(validate(cfg), VOCAB).double()


def test_compiled_blocks_give_eager_losses_and_gradients_in_every_bptt_mode() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny(False), tiny(True)
    ids = torch.randint(0, VOCAB, (B, SEGMENTS * L + 1))
    segments = split_segments(ids[:, :-1], ids[:, 1:], L)
    for mode in ({"bptt_unroll": 1, "bptt_mode": "sliding"}, {"bptt_unroll": -1, "replay": True},
                 {"bptt_unroll": -1}):
        stats = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.zero_grad(set_to_none=True)
            stats[name] = train_segments(model, segments, **mode)
        torch.testing.assert_close(stats["compiled"].loss_sum, stats["eager"].loss_sum, rtol=1e-9, atol=0)
        torch.testing.assert_close(stats["compiled"].state.memory, stats["eager"].state.memory, rtol=1e-9, atol=1e-12)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=f"{mode}: {name}")
    assert counters["stats"]["unique_graphs"] >= 2  # with gradients (checkpointed) and without
    assert not counters["graph_break"], dict(counters["graph_break"])  # each block is one graph


def test_selective_recomputation_compiles_with_its_policy() -> None:
    """recompute=elementwise inside the compiled block (its policy traced by dynamo): eager gradients."""
    eager, compiled = tiny(False, "elementwise"), tiny(True, "elementwise")
    ids = torch.randint(0, VOCAB, (B, 2 * L + 1))
    segments = split_segments(ids[:, :-1], ids[:, 1:], L)
    for model in (eager, compiled):
        train_segments(model, segments, bptt_unroll=-1)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
