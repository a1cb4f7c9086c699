"""ZeRO-3 with the recurrence (``train/zero3.py``): with ``trace_whole_steps`` DeepSpeed's parameter trace
covers a whole training step, so it completes and is followed, and training still computes what ZeRO-2
computes. One process, ``torch.distributed`` on gloo at world size 1 (``bench/zero3.py`` measures 2
processes: all-gathers and step time)."""

from __future__ import annotations

import pytest
import torch

from rmt_dist.config import Config, validate
from rmt_dist.model import build_model, split_segments, train_segments

from conftest import free_port

VOCAB, B, L, SEGMENTS = 29, 2, 6, 3


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch, gloo_world: None) -> None:
    # ZeRO-3 swaps in its own torch.nn.functional.linear for the whole process and leaves it there: put the
    # original back afterwards (other tests count what checkpointing recomputes through it).
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    for key, value in {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def engine_for(stage: int, step_trace: bool):
    import deepspeed

    from rmt_dist.train.engine import deepspeed_config
    from rmt_dist.train.zero3 import trace_whole_steps

    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = 32, 2, 4, 64
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.bptt_unroll, cfg.memory.bptt_mode = "rmt", 2, 1, "sliding"
    cfg.data.num_segments, cfg.train.batch_size, cfg.train.activation_checkpointing = SEGMENTS, B, True
    cfg.deepspeed.zero_stage = stage
    torch.manual_seed(0)
    model = build_model(validate(cfg), VOCAB)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=deepspeed_config(cfg), dist_init_required=False)
    if step_trace:
        assert trace_whole_steps(engine)
    return engine


def test_zero3_follows_a_whole_step_trace_and_trains_as_zero2(one_process_group) -> None:
    from rmt_dist.train.engine import micro_step

    ids = torch.randint(0, VOCAB, (B, SEGMENTS * L + 1))
    segments = split_segments(ids[:, :-1], ids[:, 1:], L)
    losses = {}
    for name, stage, trace in (("zero2", 2, False), ("zero3", 3, True)):
        engine = engine_for(stage, trace)
        losses[name] = [float(train_segments(engine, segments, bptt_unroll=1, bptt_mode="sliding",
                                             backward=lambda loss: micro_step(engine, loss)).loss_sum)
                        for _ in range(4)]
        if stage == 3:  # recorded in step 2, followed from step 3 on: a forward and a backward call
            coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
            assert coordinator.is_complete_trace()
    torch.testing.assert_close(losses["zero3"], losses["zero2"], rtol=1e-6, atol=0)
    assert losses["zero2"][-1] < losses["zero2"][0]
