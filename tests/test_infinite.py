"""∞-former's continuous long-term memory (rmt_dist/model/ltm.py): the ridge fit, continuous attention
against numerical integration, sticky sampling. Float64 on CPU."""

from __future__ import annotations

import math

import torch

from rmt_dist.model import ltm


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
