"""What the training loop needs from a task: batches as a pure function of (seed, step), a fixed
held-out set, and a loss per position."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

TRAIN_STREAM, HELDOUT_STREAM, PROBE_STREAM = 0, 1, 2
IGNORE = -100
"""Target id of a position that carries no loss (tasks with a ``loss_mask``, e.g. a prompt's tokens)."""


def batch_generator(seed: int, stream: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, step, micro): batch ``step`` is the same in every
    arm, every process and every resumed run, without any stored data position."""
    state = np.random.SeedSequence([seed, stream, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Task(Protocol):
    """A training task. ``x`` feeds the model; ``y`` is the target at every position."""

    name: str
    seq_len: int

    def model_overrides(self) -> dict:
        """GPTConfig fields the task fixes (input/output sizes, vocabulary, block size)."""

    def train_batch(self, step: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number ``step`` (micro-batch ``micro``), on the CPU."""

    def heldout_batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out batch number ``index`` (the same every time it is asked for)."""

    def loss_per_position(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of every sequence at every position, shape ``(B, T)``."""

    # Optional: ``loss_mask(y) -> (B, T) bool``, the positions that carry loss (e.g. an answer's
    # tokens). A task without it trains on every position; see :func:`mean_loss`.
    # Optional: ``next_token_loss = True``: ``loss_per_position`` is the cross-entropy of token-id
    # targets (IGNORE = no loss), so the model may compute it itself, head fused into the loss
    # (``model(x, targets=y)``); see :func:`position_losses`.


def loss_mask(task: Task, y: torch.Tensor) -> torch.Tensor | None:
    """The task's loss mask for targets ``y`` (``(B, T)`` bool), or None when every position counts."""
    fn = getattr(task, "loss_mask", None)
    return None if fn is None else fn(y)


def position_losses(task: Task, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``model``'s loss at every position of ``x``, ``(B, T)``. For a next-token task
    (``task.next_token_loss``) the model computes it from its last hidden states with the head fused
    into the loss (``model(x, targets=y)``: :mod:`myopia.models.token_loss`), so no logits tensor of
    the vocabulary's width exists; otherwise ``task.loss_per_position(model(x), y)``."""
    if getattr(task, "next_token_loss", False):
        return model(x, targets=y)
    return task.loss_per_position(model(x), y)


def reduce_loss(task: Task, per_position: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss the training loop minimises on one (micro-)batch from its per-position losses: the
    mean over every position, or, for a task with a loss mask, the sum over masked positions divided
    by their number (so the loss and the gradient scale are those of the masked tokens alone)."""
    mask = loss_mask(task, y)
    if mask is None:
        return per_position.mean()
    return torch.where(mask, per_position, 0.0).sum() / mask.sum().clamp(min=1)


def model_loss(task: Task, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`reduce_loss` of :func:`position_losses`: the training loss of ``model`` on ``(x, y)``."""
    return reduce_loss(task, position_losses(task, model, x, y), y)


def mean_loss(task: Task, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`reduce_loss` of the task's loss of the model output ``pred`` (logits or values)."""
    return reduce_loss(task, task.loss_per_position(pred, y), y)
