"""What the GPU showed and the CPU hid: tensors made on the wrong device, mixed dtypes under autocast, and
host syncs in the step.

- The ``meta`` device has no data: a tensor the model creates on the CPU meets a meta tensor and fails
  ("Expected all tensors to be on the same device"), and anything that reads a value on the host
  (``.item()``, ``bool(tensor.any())``, ``.tolist()``) raises. So every memory kind, both causal HF
  backbones and the whole training recurrence run here on ``meta``: the same code on CUDA creates
  nothing on the CPU and never makes the GPU wait for Python inside a step. (Two host syncs remain, and
  they are transformers' own, as in the bare models: its packed-sequence check when a causal model gets
  no mask (kind none), and its "is any padding?" check on an encoder's 2D padding mask.)
- CUDA autocast runs ``torch.linalg.solve`` in its inputs' dtypes; CPU autocast casts it to fp32. So the
  ∞-former's ridge fit is checked directly: whatever autocast and the weights' dtype are, ``solve``
  gets fp32 on both sides with autocast off.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import rmt_dist
from rmt_dist.config import Config, from_flat, validate
from rmt_dist.model import MemoryModel, build_model, forward_segments, split_segments, train_segments

from hf_tiny import bert_dir, gpt2_dir, llama_dir

META = torch.device("meta")
KINDS = ("none", "memtr", "xl", "rmt", "rmt_xl", "infinite")
VOCAB, B, L = 23, 2, 6


def builtin(kind: str) -> MemoryModel:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = 32, 2, 4, 64
    cfg.memory.kind, cfg.memory.num_tokens, cfg.memory.xl_len, cfg.memory.ltm_basis = kind, 3, 4, 8
    cfg.memory.aux_loss_weight = 0.01 if kind == "rmt_xl" else 0.0
    return build_model(validate(cfg), VOCAB)


def meta_segments(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (B, n * L + 1))
    return split_segments(ids[:, :-1].to(META), ids[:, 1:].to(META), L)


@pytest.mark.parametrize("kind", KINDS)
def test_every_memory_kind_runs_forward_on_the_meta_device(kind: str) -> None:
    model = builtin(kind).to(META)
    outputs, state = forward_segments(model, meta_segments())
    assert all(o.logits.device == META and o.logits.shape == (B, L, VOCAB) for o in outputs)
    assert all(t.device == META for t in state.tensors())
    assert (state.memory is not None) == (kind in ("rmt", "rmt_xl"))
    assert (state.ltm is not None) == (kind == "infinite")


@pytest.mark.parametrize("kind, unroll, mode, replay", [
    ("rmt", 1, "sliding", False), ("rmt", 1, "window", False), ("rmt", -1, "window", True),
    ("rmt_xl", 2, "sliding", False), ("infinite", 0, "sliding", False), ("xl", 1, "sliding", False),
])
def test_training_recurrence_never_waits_for_the_device(kind: str, unroll: int, mode: str, replay: bool) -> None:
    model = builtin(kind).to(META)
    stats = train_segments(model, meta_segments(4), bptt_unroll=unroll, bptt_mode=mode, replay=replay)
    assert stats.loss_sum.device == META and stats.n_tokens.device == META
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {"gpt2": gpt2_dir(root), "llama": llama_dir(root), "bert": bert_dir(root)}


def hf_model(path: str, kind: str, classes: int = 0) -> MemoryModel:
    cfg = from_flat({"model.backbone": "hf", "model.hf_name_or_path": path, "memory.kind": kind,
                     "memory.num_tokens": 2})
    return build_model(validate(cfg), classes)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["memtr", "rmt"])  # (none is the bare model's own path: see hf.py)
def test_causal_hf_backbones_with_memory_run_forward_backward_on_meta(hf_dirs: dict[str, str], which: str,
                                                                      kind: str) -> None:
    model = hf_model(hf_dirs[which], kind).to(META)
    ids = torch.randint(1, 300, (B, 3 * L + 1))
    segments = split_segments(ids[:, :-1].to(META), ids[:, 1:].to(META), L)
    outputs, _ = forward_segments(model, segments)
    assert all(o.logits.device == META for o in outputs)
    train_segments(model, segments, bptt_unroll=1, bptt_mode="sliding")
    assert model.backbone.hf.get_input_embeddings().weight.grad.device == META


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_generation_creates_nothing_on_the_host(hf_dirs: dict[str, str], which: str) -> None:
    model = hf_model(hf_dirs[which], "rmt").to(META)
    prompt = torch.randint(1, 300, (B, 7)).to(META)
    out = rmt_dist.generate(model, prompt, segment_len=4, max_new_tokens=5)  # crosses a segment end
    assert out.device == META and out.shape == (B, 12)


def test_ltm_fit_is_fp32_with_autocast_off_whatever_the_weights_and_autocast(monkeypatch: Any) -> None:
    """bf16 weights (DeepSpeed's bf16 mode) under bf16 autocast: ``solve`` must still see fp32 and fp32,
    with autocast off, as CUDA autocast would not cast them for it."""
    seen: list[tuple[torch.dtype, torch.dtype, bool]] = []
    solve = torch.linalg.solve

    def checked_solve(a: torch.Tensor, b: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        seen.append((a.dtype, b.dtype, torch.is_autocast_enabled("cpu")))
        return solve(a, b, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve", checked_solve)
    model = builtin("infinite").to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (B, 3 * L))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, state = forward_segments(model, split_segments(ids, ids, L))
    assert len(seen) == 3 * 2  # a fit per segment and layer
    assert set(seen) == {(torch.float32, torch.float32, False)}, set(seen)
    assert all(c.dtype == torch.float32 for c in state.ltm)
    assert torch.isfinite(outputs[-1].logits.float()).all()
