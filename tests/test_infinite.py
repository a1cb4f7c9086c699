"""∞-former's continuous long-term memory (memory.kind=infinite): the ridge fit, continuous attention
against numerical integration, sticky sampling, constant cost per segment however long the past,
causality and information flow through the LTM alone, stop-gradient, checkpoint round trip.

The generic properties (manual unroll, replay == full BPTT, no leakage with an XL short-term memory)
are run for kind=infinite by tests/test_model.py and tests/test_recurrence.py. Tiny float64 models."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rmt_dist.config import Config
from rmt_dist.model import MemoryModel, MemoryState, build_model, forward_segments
from rmt_dist.model import ltm

VOCAB, B, L, S = 23, 2, 5, 3
TIGHT = dict(rtol=0.0, atol=1e-12)


def tiny(xl_len: int = 0, sticky: bool = False, basis: int = 12, samples: int = 10, d: int = 32,
         layers: int = 2, ac: bool = False, dropout: float = 0.0) -> MemoryModel:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_ff = d, layers, 4, 2 * d
    cfg.model.dropout = dropout
    cfg.memory.kind, cfg.memory.xl_len, cfg.memory.sticky = "infinite", xl_len, sticky
    cfg.memory.ltm_basis, cfg.memory.ltm_samples = basis, samples
    cfg.train.activation_checkpointing = ac
    torch.manual_seed(0)
    return build_model(cfg, VOCAB).double()


def segments_of(ids: torch.Tensor, seg_len: int = L) -> list[tuple[torch.Tensor, torch.Tensor]]:
    labels = ids.roll(-1, dims=1)
    return [(ids[:, i:i + seg_len], labels[:, i:i + seg_len]) for i in range(0, ids.shape[1], seg_len)]


def all_logits(model: MemoryModel, ids: torch.Tensor) -> torch.Tensor:
    outputs, _ = forward_segments(model, segments_of(ids))
    return torch.cat([o.logits for o in outputs], dim=1)


def test_ridge_fit_error_falls_as_the_basis_grows() -> None:
    t = torch.linspace(0, 1, 400, dtype=torch.float64)
    x = torch.stack([torch.sin(2 * math.pi * t), 0.5 * torch.cos(6 * math.pi * t) + t ** 2], -1)  # [P, 2]
    errors = []
    for n in (6, 12, 24, 48):
        centres, widths = ltm.basis(n, dtype=torch.float64)
        coeffs = ltm.ridge_fit(t[None], x[None], centres, widths, ridge=1e-6)  # [1, n, 2]
        assert coeffs.shape == (1, n, 2)
        inner = slice(20, -20)  # away from the ends, where every basis is one-sided
        errors.append((ltm.evaluate(coeffs, t[None], centres, widths)[0, inner] - x[inner]).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


def test_continuous_attention_equals_numerical_integration_of_its_density() -> None:
    torch.manual_seed(0)
    att = ltm.ContinuousAttention(d_model=8, n_heads=2, n_basis=10).double()
    with torch.no_grad():
        att.w_sigma.mul_(-200)  # some narrow densities as well as wide ones
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    coeffs = torch.randn(2, 10, 8, dtype=torch.float64)
    out, mean, var = att(h, coeffs)
    assert ((mean > 0) & (mean < 1)).all() and (var > 0).all()
    assert var.min() < 0.05 < var.max()
    _, _, v = att.density(h, coeffs)  # [B, H, N, hd]
    context = torch.empty(2, 2, 3, 4, dtype=torch.float64)
    for b in range(2):
        for hd in range(2):
            for i in range(3):
                std = var[b, hd, i].sqrt().item()  # a fine grid over +-12 std of this density
                grid = torch.linspace(mean[b, hd, i].item() - 12 * std, mean[b, hd, i].item() + 12 * std, 40001,
                                      dtype=torch.float64)
                psi = ltm.psi(grid, att.centres, att.widths)  # [G, N]
                p = ltm.gaussian(grid, mean[b, hd, i], var[b, hd, i])  # [G]
                torch.testing.assert_close(torch.trapezoid(p, grid), torch.tensor(1.0, dtype=torch.float64),
                                           rtol=0, atol=1e-9)  # a density
                r = torch.trapezoid(p[:, None] * psi, grid, dim=0)  # [N] = E[psi(t)]
                torch.testing.assert_close(
                    r, ltm.expected_basis(mean[b, hd, i], var[b, hd, i], att.centres, att.widths),
                    rtol=1e-7, atol=1e-9)
                context[b, hd, i] = r @ v[b, hd]
    expected = att.out(context.transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-9)


def test_sticky_positions_follow_the_histogram_they_are_given() -> None:
    hist = torch.tensor([[0.5, 0.0, 0.1, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    m = 200
    pos = ltm.sticky_positions(hist, m)
    assert pos.shape == (2, m) and ((pos >= 0) & (pos <= 1)).all()
    counts = torch.stack([torch.histc(row, bins=4, min=0, max=1) for row in pos]) / m
    assert (counts - hist).abs().max() <= 1 / m + 1e-12, counts
    torch.testing.assert_close(pos[1], (torch.arange(m, dtype=torch.float64) + 0.5) / m)  # uniform -> evenly
    assert torch.equal(ltm.sticky_positions(hist, m), pos)  # deterministic (replay re-runs it)


def test_attention_histogram_is_the_mass_each_bin_received() -> None:
    mean = torch.tensor([[0.35, 0.35], [0.95, 0.15]], dtype=torch.float64)
    var = torch.full_like(mean, 1e-4)
    hist = ltm.attention_histogram(mean, var, bins=10)
    torch.testing.assert_close(hist.sum(-1), torch.ones(2, dtype=torch.float64))
    assert hist[0].argmax() == 3 and hist[0, 3] > 0.99
    torch.testing.assert_close(hist[1, [1, 9]], torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-3)


def test_state_and_work_per_segment_stay_constant_from_1k_to_64k_tokens() -> None:
    """64 segments of 1024 tokens: the LTM state keeps its size and every segment after the first
    counts the same FLOPs, however much was processed before it."""
    model = tiny(basis=16, samples=16, d=16, layers=1).float().eval()
    seg_len = 1024
    state = model.init_state()
    sizes, flops = [], []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for j in range(64):
            ids = torch.randint(0, VOCAB, (1, seg_len), generator=g)
            with FlopCounterMode(display=False) as counter:
                out = model(ids, None, state)
            state = out.state
            sizes.append(state.nbytes())
            flops.append(counter.get_total_flops())
    assert len(state.ltm) == 1 and state.ltm[0].shape == (1, 16, 16)
    assert set(sizes) == {model.state_bytes_per_sequence()}
    assert flops[1] > flops[0]  # the first segment has no memory to read
    assert set(flops[1:]) == {flops[1]}, (flops[1], flops[-1])


@pytest.mark.parametrize("sticky", (False, True))
@pytest.mark.parametrize("xl_len", (0, 3))
def test_no_future_token_changes_earlier_logits(sticky: bool, xl_len: int) -> None:
    model = tiny(xl_len=xl_len, sticky=sticky).eval()
    ids = torch.randint(0, VOCAB, (B, S * L))
    base = all_logits(model, ids)
    for t in (L, L + 2, 2 * L - 1, 2 * L + 3):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(B)) % VOCAB
        out = all_logits(model, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], **TIGHT, msg=f"token {t} leaked backwards")
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("sticky", (False, True))
@pytest.mark.parametrize("xl_len", (0, 3))
def test_the_ltm_alone_carries_segment_0_into_later_segments(sticky: bool, xl_len: int) -> None:
    """Token 0 leaves an XL cache of 3 < L within segment 0, so only the LTM can carry it on."""
    model = tiny(xl_len=xl_len, sticky=sticky).eval()
    ids = torch.randint(0, VOCAB, (B, S * L))
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB
    diff = all_logits(model, changed) - all_logits(model, ids)
    assert diff[:, L:2 * L].abs().max() > 1e-8 and diff[:, 2 * L:].abs().max() > 1e-8
    for att in model.ltm_attention:  # and without the LTM read, nothing does
        torch.nn.init.zeros_(att.out.weight)
        torch.nn.init.zeros_(att.out.bias)
    diff = all_logits(model, changed) - all_logits(model, ids)
    if xl_len == 0:
        torch.testing.assert_close(diff[:, L:], torch.zeros_like(diff[:, L:]), **TIGHT)


def test_sticky_changes_what_the_memory_keeps() -> None:
    plain, sticky = tiny(), tiny(sticky=True)
    ids = torch.randint(0, VOCAB, (B, S * L))
    _, a = forward_segments(plain.eval(), segments_of(ids))
    _, b = forward_segments(sticky.eval(), segments_of(ids))
    assert not torch.allclose(a.ltm[0], b.ltm[0])


def test_ltm_is_stop_gradient_and_its_attention_is_trained() -> None:
    model = tiny()
    ids = torch.randint(0, VOCAB, (B, S * L))
    leaf = torch.zeros(B, L, 32, dtype=torch.float64, requires_grad=True)
    first = ids[:, :L]
    handle = model.backbone.embed.register_forward_hook(
        lambda mod, args, out: out + leaf if torch.equal(args[0], first) else out)
    outputs, state = forward_segments(model, segments_of(ids))
    handle.remove()
    assert all(not c.requires_grad for c in state.ltm)
    params = list(model.ltm_attention.parameters())
    grads = torch.autograd.grad(outputs[2].loss_sum, [leaf] + params, allow_unused=True)
    assert grads[0] is None or grads[0].abs().max() == 0
    assert all(g is not None and g.abs().max() > 0 for g in grads[1:])
    assert not model.carries_gradient and model.recurrent


def test_activation_checkpointing_gives_the_same_gradients_and_sticky_state() -> None:
    ids = torch.randint(0, VOCAB, (B, S * L))
    results = []
    for ac in (False, True):
        model = tiny(sticky=True, xl_len=3, ac=ac, dropout=0.1)
        torch.manual_seed(1)
        outputs, state = forward_segments(model, segments_of(ids))
        sum(o.loss_sum for o in outputs).backward()
        results.append(({n: p.grad.clone() for n, p in model.named_parameters()}, state))
    (g0, s0), (g1, s1) = results
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(s0.ltm, s1.ltm):
        torch.testing.assert_close(a, b, **TIGHT)


def test_checkpoint_round_trip_keeps_the_ltm(tmp_path) -> None:
    model = tiny(xl_len=3)
    _, state = forward_segments(model.eval(), segments_of(torch.randint(0, VOCAB, (B, S * L))))
    torch.save(state.detach().state_dict(), tmp_path / "s.pt")
    back = MemoryState()
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert len(back.ltm) == 2 and len(back.xl) == 2
    for a, b in zip(back.tensors(), state.tensors()):
        assert torch.equal(a, b)
    old = MemoryState()
    old.load_state_dict({"memory": None, "xl": None})  # written before kind=infinite
    assert old == MemoryState()


@pytest.mark.slow
def test_sort_task_trains_through_the_job_on_ray_workers(tmp_path, data_cache, ray_local, mlflow_server) -> None:
    """jobs/algorithmic.py --task sort --memory.kind infinite: 2 Ray workers, DeepSpeed ZeRO-2, MLflow;
    the loss falls and memory_state_bytes is the LTM's coefficients (constant in length)."""
    import mlflow

    from rmt_dist.config import from_flat
    from rmt_dist.presets import PRESETS
    from rmt_dist.train.driver import run_training

    cfg = from_flat({**PRESETS["algorithmic"]["smoke"], "data.task": "sort", "memory.kind": "infinite",
                     "data.task_length": 40, "data.segment_len": 16, "data.num_segments": 4,
                     "data.num_train": 2000, "data.num_valid": 64, "data.num_test": 64, "data.cache_dir": data_cache,
                     "train.max_steps": 40, "train.eval_interval": 20, "storage.path": str(tmp_path / "runs"),
                     "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": "sort"})
    result = run_training(cfg, "algorithmic", run_name="sort_infinite")
    assert result.metrics["step"] == 40 and 0.0 <= result.metrics["val_acc"] <= 1.0

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("sort").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.task"] == "sort"
    by_step = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    losses = [by_step[s] for s in sorted(by_step)]
    assert sorted(by_step) == list(range(1, 41)) and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    d, layers, basis = cfg.model.d_model, cfg.model.n_layers, cfg.memory.ltm_basis
    assert run.data.metrics["memory_state_bytes"] == basis * layers * d * 4  # fp32 coefficients, one sequence
