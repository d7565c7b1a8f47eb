"""What the training loop needs from a task: batches as a pure function of (seed, step), a fixed
held-out set, and a loss per position."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

TRAIN_STREAM, HELDOUT_STREAM, PROBE_STREAM = 0, 1, 2


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
