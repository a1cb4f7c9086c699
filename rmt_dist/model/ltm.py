"""∞-former's continuous long-term memory (PAPERS.md section 3, arXiv 2109.00301), torch only.

The LTM of one layer is a signal X(t) = B^T psi(t) on t in [0, 1]: N Gaussian radial basis functions
psi_j(t) = N(t; mu_j, sigma_j^2) (densities, two widths) with coefficients B [N, d] fit by ridge
regression, B^T = X^T F^T (F F^T + lambda I)^-1. Its size is N x d however long the past is.

Reading it (``ContinuousAttention``): each query head predicts a Gaussian density over t, mean
sigmoid(w_mu . s) and variance softplus(w_sigma . s), where s = K q / sqrt(hd) are the query's scores
against keys K = B W_K. The context is the expected value of V(t) = (B W_V)^T psi(t) under it, in
closed form: E[psi_j] = N(mean; mu_j, var + sigma_j^2) (the integral over R of a product of two
Gaussian densities).

Writing it (``update``): the old signal is sampled at M points (evenly, or by the attention it got:
sticky memories), contracted into [0, tau]; the new states go evenly into [tau, 1]; B is refit.
Everything here is stop-gradient: the coefficients are fit on detached states, as the paper does.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WIDTH_FACTORS = (0.75, 3.0)  # sigma of each basis group in units of its centre spacing (narrow, wide)
VAR_FLOOR = 1e-6


def basis(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Centres and widths [n] of n Gaussian RBFs: one group per width factor, centres evenly over
    [0, 1] within each group (the paper mixes widths the same way)."""
    sizes = [n // len(WIDTH_FACTORS) + (1 if i < n % len(WIDTH_FACTORS) else 0) for i in range(len(WIDTH_FACTORS))]
    centres, widths = [], []
    for size, factor in zip(sizes, WIDTH_FACTORS):
        if size:
            centres.append(torch.linspace(0.0, 1.0, size, device=device, dtype=dtype) if size > 1
                           else torch.full((1,), 0.5, device=device, dtype=dtype))
            widths.append(torch.full((size,), factor / max(size - 1, 1), device=device, dtype=dtype))
    return torch.cat(centres), torch.cat(widths)


def gaussian(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """N(x; mean, var), broadcasting."""
    return torch.exp(-0.5 * (x - mean) ** 2 / var) / torch.sqrt(2 * math.pi * var)


def psi(t: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """[..., P] positions -> [..., P, N] basis values."""
    return gaussian(t.unsqueeze(-1), centres, widths ** 2)


def expected_basis(mean: Tensor, var: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """[...] means and variances -> [..., N]: E_{t ~ N(mean, var)}[psi_j(t)] in closed form."""
    return gaussian(mean.unsqueeze(-1), centres, var.unsqueeze(-1) + widths ** 2)


def ridge_fit(t: Tensor, x: Tensor, centres: Tensor, widths: Tensor, ridge: float) -> Tensor:
    """Positions t [B, P] and values x [B, P, d] -> coefficients [B, N, d]:
    B = (F F^T + lambda I)^-1 F X with F = [psi(t_1) ... psi(t_P)] of shape [N, P]."""
    f = psi(t, centres, widths).transpose(1, 2)  # [B, N, P]
    gram = f @ f.transpose(1, 2) + ridge * torch.eye(f.shape[1], device=f.device, dtype=f.dtype)
    return torch.linalg.solve(gram, f @ x)


def evaluate(coeffs: Tensor, t: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """The signal at positions t [B, P]: [B, P, d]."""
    return psi(t, centres, widths) @ coeffs


def attention_histogram(mean: Tensor, var: Tensor, bins: int) -> Tensor:
    """Mean [B, ...] and var [B, ...] of densities -> [B, bins]: the probability mass each equal bin
    of [0, 1] received, summed over all densities of a batch row and normalised (mass outside [0, 1]
    is dropped; a row with none left is uniform)."""
    edges = torch.linspace(0.0, 1.0, bins + 1, device=mean.device, dtype=mean.dtype)
    std = var.clamp(min=VAR_FLOOR).sqrt().reshape(mean.shape[0], -1, 1)
    cdf = torch.special.ndtr((edges - mean.reshape(mean.shape[0], -1, 1)) / std)  # [B, Q, bins + 1]
    mass = (cdf[..., 1:] - cdf[..., :-1]).sum(1) + 1e-12  # [B, bins]
    return mass / mass.sum(-1, keepdim=True)


def sticky_positions(histogram: Tensor, m: int) -> Tensor:
    """[B, D] bin probabilities over [0, 1] -> [B, m] positions at the quantiles (j + 0.5) / m of the
    piecewise-constant density: each bin gets a share of the positions equal to its probability (to
    within one position), deterministically, so replays and re-runs sample the same points."""
    b, d = histogram.shape
    cdf = torch.cumsum(histogram, -1)
    cdf = cdf / cdf[:, -1:]  # [B, D], last = 1
    u = ((torch.arange(m, device=histogram.device, dtype=histogram.dtype) + 0.5) / m).expand(b, m).contiguous()
    k = torch.searchsorted(cdf, u).clamp(max=d - 1)  # bin of each quantile
    lower = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], -1).gather(1, k)
    p = histogram.gather(1, k) / histogram.sum(-1, keepdim=True)
    frac = ((u - lower) / p.clamp(min=1e-12)).clamp(0.0, 1.0)
    return (k.to(histogram.dtype) + frac) / d


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def update(coeffs: Tensor | None, new: Tensor, centres: Tensor, widths: Tensor, *, tau: float, ridge: float,
           samples: int, histogram: Tensor | None = None) -> Tensor:
    """The next coefficients [B, N, d] from the old ones (None: empty memory) and new states [B, n, d]:
    old signal sampled at ``samples`` points (at the ``histogram``'s quantiles if given, else evenly)
    into [0, tau], new states evenly into [tau, 1] (into [0, 1] when the memory is empty).

    Computed in the dtype of ``centres`` (fp32 or wider) with autocast off: CUDA autocast would run the
    fit's matmuls in bf16 and ``linalg.solve`` in its inputs' mixed dtypes (a crash; CPU autocast casts
    ``solve`` to fp32, which hides it), and the coefficients are the memory itself."""
    with _autocast_off(new.device):
        return _update(coeffs, new, centres, widths, tau=tau, ridge=ridge, samples=samples, histogram=histogram)


def _update(coeffs: Tensor | None, new: Tensor, centres: Tensor, widths: Tensor, *, tau: float, ridge: float,
            samples: int, histogram: Tensor | None) -> Tensor:
    new = new.detach().to(centres.dtype)
    b, n = new.shape[:2]
    grid = (torch.arange(n, device=new.device, dtype=new.dtype) + 0.5) / n  # [n] cell centres
    if coeffs is None:
        return ridge_fit(grid.expand(b, n), new, centres, widths, ridge)
    if histogram is None:
        s = ((torch.arange(samples, device=new.device, dtype=new.dtype) + 0.5) / samples).expand(b, samples)
    else:
        s = sticky_positions(histogram.to(new.dtype), samples)
    old = evaluate(coeffs.detach().to(new.dtype), s, centres, widths)  # [B, M, d]
    t = torch.cat([tau * s, (tau + (1 - tau) * grid).expand(b, n)], dim=1)
    return ridge_fit(t, torch.cat([old, new], dim=1), centres, widths, ridge)


class ContinuousAttention(nn.Module):
    """Multi-head continuous attention over one layer's LTM; a module of its own (own projections)
    so that ZeRO-3 gathers its parameters when it is called."""

    def __init__(self, d_model: int, n_heads: int, n_basis: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.w_mu = nn.Parameter(torch.randn(n_heads, n_basis) * 0.02)
        self.w_sigma = nn.Parameter(torch.randn(n_heads, n_basis) * 0.02)
        centres, widths = basis(n_basis)
        self.register_buffer("centres", centres, persistent=False)
        self.register_buffer("widths", widths, persistent=False)

    def density(self, h: Tensor, coeffs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, T, d], coeffs [B, N, d] -> mean, var [B, H, T] and values [B, H, N, hd]."""
        B, T, _ = h.shape
        N = coeffs.shape[1]
        q = self.q(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k, v = self.kv(coeffs.to(h.dtype)).view(B, N, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, T, N]
        mean = torch.sigmoid(torch.einsum("bhtn,hn->bht", scores, self.w_mu.to(h.dtype)))
        var = F.softplus(torch.einsum("bhtn,hn->bht", scores, self.w_sigma.to(h.dtype))) + VAR_FLOOR
        return mean, var, v

    def forward(self, h: Tensor, coeffs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Context [B, T, d] (after the output projection) and each head's density's mean, var [B, H, T]."""
        B, T, d = h.shape
        mean, var, v = self.density(h, coeffs)
        r = expected_basis(mean, var, self.centres.to(h.dtype), self.widths.to(h.dtype))  # [B, H, T, N]
        context = (r @ v).transpose(1, 2).reshape(B, T, d)
        return self.out(context), mean, var


class LTMRead:
    """A layer's LTM read as the backbone's per-layer side input: ``read(h)`` is added to the block's
    attention output; the densities of the last call are kept (detached) for sticky memories. (Under
    activation checkpointing the recomputation stores the same values again.)"""

    def __init__(self, attention: ContinuousAttention, coeffs: Tensor) -> None:
        self.attention, self.coeffs = attention, coeffs
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def __call__(self, h: Tensor) -> Tensor:
        out, mean, var = self.attention(h, self.coeffs)
        self.mean, self.var = mean.detach(), var.detach()
        return out
