"""The myopic gradient by its definition, independent of myopia's implementation.

The myopic gradient of Σ_i L_i is Σ_i ∂L_i/∂θ with, for the loss at position i, every other
position's attention input (``hidden``: the normalised hidden states entering attention) or its
keys/values (``kv``: after projection and rotary) treated as constants. We compute it literally: one
forward/backward per position i, with everything at positions j ≠ i detached at the cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def mix_position(t: torch.Tensor, i: int, dim: int) -> torch.Tensor:
    """``t`` live at index ``i`` along ``dim`` and detached everywhere else."""
    shape = [1] * t.dim()
    shape[dim] = t.shape[dim]
    keep = (torch.arange(t.shape[dim], device=t.device) == i).view(shape)
    return torch.where(keep, t, t.detach())


def per_position_gradient(
    params: list[torch.nn.Parameter],
    T: int,
    loss_at: Callable[[int], torch.Tensor],
    install_cut: Callable[[int], Iterable],
) -> list[torch.Tensor]:
    """Σ_i grad(L_i) where ``install_cut(i)`` returns hook handles cutting positions j ≠ i."""
    total = [torch.zeros_like(p) for p in params]
    for i in range(T):
        handles = list(install_cut(i))
        try:
            grads = torch.autograd.grad(loss_at(i), params, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for acc, g in zip(total, grads):
            if g is not None:
                acc += g
    return total


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    norm = torch.sqrt(sum((y**2).sum() for y in b))
    return float(diff / norm)


def gradients(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
