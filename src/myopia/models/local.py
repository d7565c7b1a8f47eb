"""Local myopia (the paper's "local myopia bonus"): a model that reads a *frozen* model's past.

``LocalMyopicGPT(frozen, model)``: at every block, each position reads the frozen model's residual
stream at earlier positions (through ``model``'s own pre-attention norm and live key/value weights)
and its own position through ``model``. Trained from ``model = copy of frozen``, the held-out loss it
reaches measures how much the present-position computation alone could improve with the past fixed:
the tied local myopia bonus L(θ) − min_φ Σ_j L_j(θ, …, θ, φ) ≥ 0 (φ = θ is feasible).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from myopia.models.gpt import GPT


class LocalMyopicGPT(nn.Module):
    """``forward(x)`` → ``model``'s logits with ``frozen``'s states as the past at every block.

    Only ``model``'s parameters train; ``frozen`` stays in eval mode with gradients off. With equal
    weights the output equals ``frozen(x)`` exactly.
    """

    def __init__(self, frozen: GPT, model: GPT | None = None):
        super().__init__()
        self.frozen = frozen
        self.frozen.requires_grad_(False).eval()
        self.model = model if model is not None else copy.deepcopy(frozen).requires_grad_(True)
        if self.frozen.config.n_layer != self.model.config.n_layer:
            raise ValueError("LocalMyopicGPT: the frozen model and the trained model need the same number of blocks")

    @property
    def config(self):
        return self.model.config

    def train(self, mode: bool = True) -> LocalMyopicGPT:
        super().train(mode)
        self.frozen.eval()  # no dropout in the states that serve as the past
        return self

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, return_hidden_states: bool = False):
        with torch.no_grad():
            _, past = self.frozen(x, return_hidden_states=True)
        return self.model(x, targets, past_states=past[:-1], return_hidden_states=return_hidden_states)


__all__ = ["LocalMyopicGPT"]
