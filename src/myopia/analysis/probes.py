"""Linear probes from float64 sufficient statistics: closed-form ridge, held-out centred R².

Accumulate ``(h, z)`` pairs batch by batch into :class:`ProbeStats` (no activations are kept), fit
on one set and score on another:

>>> train, test = ProbeStats(d, k), ProbeStats(d, k)
>>> train.add(h_train, z_train); test.add(h_test, z_test)
>>> r2 = test.r2(train.fit(ridge=1e-4))       # one R² per target column

R² is *centred*: 1 − SSE / Σ(z − z̄)², with z̄ the held-out mean, so a probe that predicts the mean
scores 0 (the paper's code reported an uncentred R², which credits predicting a non-zero mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RidgeFit:
    weight: torch.Tensor  # (d, k)
    bias: torch.Tensor  # (k,)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return h.double() @ self.weight + self.bias


class ProbeStats:
    """Running float64 sums n, Σh, Σz, HᵀH, HᵀZ, Σz² for hidden states h ∈ R^d and targets z ∈ R^k."""

    def __init__(self, dim: int, n_targets: int):
        self.n = 0
        self.sum_h = torch.zeros(dim, dtype=torch.float64)
        self.sum_z = torch.zeros(n_targets, dtype=torch.float64)
        self.hh = torch.zeros(dim, dim, dtype=torch.float64)
        self.hz = torch.zeros(dim, n_targets, dtype=torch.float64)
        self.zz = torch.zeros(n_targets, dtype=torch.float64)

    def add(self, h: torch.Tensor, z: torch.Tensor) -> None:
        """``h``: (..., d) and ``z``: (..., k) with the same leading shape."""
        h = h.detach().reshape(-1, h.shape[-1]).double().cpu()
        z = z.detach().reshape(-1, z.shape[-1]).double().cpu()
        self.n += h.shape[0]
        self.sum_h += h.sum(0)
        self.sum_z += z.sum(0)
        self.hh += h.T @ h
        self.hz += h.T @ z
        self.zz += (z * z).sum(0)

    def fit(self, ridge: float = 1e-4) -> RidgeFit:
        """Ridge regression with an unpenalised bias; ``ridge`` is relative to the mean feature variance."""
        if self.n < 2:
            raise ValueError("a probe needs at least two samples")
        mean_h, mean_z = self.sum_h / self.n, self.sum_z / self.n
        cov_hh = self.hh - self.n * torch.outer(mean_h, mean_h)
        cov_hz = self.hz - self.n * torch.outer(mean_h, mean_z)
        scale = cov_hh.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(cov_hh.shape[0], dtype=torch.float64)
        weight = torch.linalg.solve(cov_hh + ridge * scale * eye, cov_hz)
        return RidgeFit(weight=weight, bias=mean_z - mean_h @ weight)

    def r2(self, fit: RidgeFit) -> torch.Tensor:
        """Centred R² of ``fit`` on these samples, one value per target."""
        w, b = fit.weight, fit.bias
        # SSE = Σ (z - hW - b)² expanded in the sufficient statistics.
        pred_sq = ((self.hh @ w) * w).sum(0) + 2 * b * (self.sum_h @ w) + self.n * b * b
        cross = (self.hz * w).sum(0) + b * self.sum_z
        sse = self.zz - 2 * cross + pred_sq
        sst = self.zz - self.sum_z**2 / self.n
        return 1.0 - sse / sst.clamp_min(1e-300)
