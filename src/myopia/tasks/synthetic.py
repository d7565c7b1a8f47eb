"""The paper's synthetic pre-caching task (Wu et al. §4), generated on the fly from the seed.

x_n ~ N(0, 1) i.i.d., z_n ~ Bernoulli(p); the model reads (x_n, z_n) and predicts

    y_n = z_n · Σ_{i=shift}^{shift+window-1} f(x_{n-i}) + (1 - z_n) · x_n,

with terms before the start of the sequence equal to 0 (after f). The paper's task has shift 1,
window 10 and f(x) = sin(10x): f(x_m) is useless at position m but needed at m+1..m+10, so only the
off-diagonal gradient can teach the model to compute it where x_m is read. shift 0 puts x_n inside
its own window (the *breadcrumbs* control: the feature is useful at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from myopia.tasks.base import HELDOUT_STREAM, TRAIN_STREAM, batch_generator

FUNCTIONS = ("sin", "square", "abs", "relu")


@dataclass
class SyntheticConfig:
    """The synthetic regression task."""

    f: str = "sin"
    """Feature function: sin (sin(frequency·x)) | square | abs | relu."""
    frequency: float = 10.0
    """Frequency k of f(x) = sin(k·x)."""
    window: int = 10
    """Number of past terms summed into the target."""
    shift: int = 1
    """Offset of the window: 1 = the paper's task (x_n not in its own window), 0 = breadcrumbs control."""
    p: float = 1.0
    """Probability that a position carries the task (z_n = 1); otherwise the target is x_n."""
    seq_len: int = 64
    """Sequence length."""
    huber_delta: float = 1.0
    """Huber loss delta."""

    def __post_init__(self) -> None:
        if self.f not in FUNCTIONS:
            raise ValueError(f"f={self.f!r} is not one of {', '.join(FUNCTIONS)}")
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")
        if self.shift < 0:
            raise ValueError(f"shift={self.shift} must be >= 0")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p={self.p} must lie in (0, 1]")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta={self.huber_delta} must be positive")

    def feature(self, x: torch.Tensor) -> torch.Tensor:
        if self.f == "sin":
            return torch.sin(self.frequency * x)
        if self.f == "square":
            return x * x
        if self.f == "abs":
            return x.abs()
        return torch.relu(x)


def window_sum(fx: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """c_n = Σ_{i=shift}^{shift+window-1} fx_{n-i}, zero before the start; ``fx`` is ``(B, T)``."""
    B, T = fx.shape
    csum = F.pad(torch.cumsum(fx, dim=1), (1, 0))  # csum[:, m] = Σ_{j<m} fx_j
    n = torch.arange(T)
    hi = (n - shift + 1).clamp(min=0)  # exclusive end: index n - shift
    lo = (n - shift - window + 1).clamp(min=0)
    return csum[:, hi] - csum[:, lo]


def generate(cfg: SyntheticConfig, batch_size: int, generator: torch.Generator):
    """One batch: inputs ``(B, T, 2)`` = (x, z), targets ``(B, T, 1)``, and x ``(B, T)``."""
    x = torch.randn(batch_size, cfg.seq_len, generator=generator)
    z = (torch.rand(batch_size, cfg.seq_len, generator=generator) < cfg.p).float()
    c = window_sum(cfg.feature(x), cfg.window, cfg.shift)
    y = z * c + (1.0 - z) * x
    return torch.stack([x, z], dim=-1), y.unsqueeze(-1), x


class SyntheticTask:
    name = "synthetic"

    def __init__(self, cfg: SyntheticConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.seq_len = cfg.seq_len

    def model_overrides(self) -> dict:
        return {"input_dim": 2, "output_dim": 1, "block_size": self.cfg.seq_len}

    def train_batch(self, step: int, micro: int, batch_size: int):
        x, y, _ = generate(self.cfg, batch_size, batch_generator(self.seed, TRAIN_STREAM, step, micro))
        return x, y

    def heldout_batch(self, index: int, batch_size: int):
        x, y, _ = generate(self.cfg, batch_size, batch_generator(self.seed, HELDOUT_STREAM, index))
        return x, y

    def loss_per_position(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(pred.float(), y.float(), delta=self.cfg.huber_delta, reduction="none").squeeze(-1)

    def trivial_loss(self, n_batches: int = 64, batch_size: int = 512) -> float:
        """Held-out Huber loss of the constant-zero predictor (1.2569 for the paper's task at p=1)."""
        total = 0.0
        for i in range(n_batches):
            _, y = self.heldout_batch(i, batch_size)
            total += self.loss_per_position(torch.zeros_like(y), y).mean().item()
        return total / n_batches
