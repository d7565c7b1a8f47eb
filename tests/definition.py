"""The myopic gradient by its definition, independent of myopia's implementation.

The myopic gradient of Σ_i L_i is Σ_i ∂L_i/∂θ with, for the loss at position i, every other
position's attention input (``hidden``: the normalised hidden states entering attention) or its
keys/values (``kv``: after projection and rotary) treated as constants. We compute it literally: one
forward/backward per position i, with everything at positions j ≠ i detached at the cut
(:func:`per_position_gradient`).

A cut with a horizon w is a property of each attention layer's edges: the query at position i reads
the cut input at positions j with i − j > w as constants, and at i − w ≤ j ≤ i live. We compute it
literally too (:func:`rows_with_window`): the layer's output row i is computed from a copy of its
input that is live in the window and detached before it, one forward per row, and the gradient of
Σ_i L_i then flows through exactly the edges the definition keeps. With w = 0 in every layer it is
the per-position definition above (a test checks that the two agree).
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


def mix_window(t: torch.Tensor, i: int, horizon: int, dim: int) -> torch.Tensor:
    """``t`` live at indices ``j ≥ i − horizon`` along ``dim`` and detached before them."""
    shape = [1] * t.dim()
    shape[dim] = t.shape[dim]
    keep = (torch.arange(t.shape[dim], device=t.device) >= i - horizon).view(shape)
    return torch.where(keep, t, t.detach())


def rows_with_window(
    compute: Callable[[int], torch.Tensor], T: int, dim: int
) -> torch.Tensor:
    """Stack ``compute(i)``'s row ``i`` along ``dim`` for every ``i``: ``compute(i)`` is the layer's
    output computed with row i's window cut (e.g. its input mixed by :func:`mix_window`)."""
    rows = [compute(i).select(dim, i) for i in range(T)]
    return torch.stack(rows, dim)


def cut_module_input(modules, i: int) -> list:
    """Forward pre-hooks that hand each module (a transformers attention module) its hidden states
    live at position ``i`` and detached elsewhere; returns the handles."""
    def pre(m, args, kwargs):
        if args:
            return (mix_position(args[0], i, 1),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": mix_position(kwargs["hidden_states"], i, 1)}
    return [m.register_forward_pre_hook(pre, with_kwargs=True) for m in modules]


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
