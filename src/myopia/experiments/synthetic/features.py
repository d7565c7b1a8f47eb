"""The synthetic task's feature for per-feature attribution: the linear probe for f(x_n), refitted on
the model as it is at every measurement (:mod:`myopia.runs.feature_attribution`)."""

from __future__ import annotations

import torch
from torch import nn

from myopia.analysis.probes import ProbeStats
from myopia.runs.feature_attribution import AttributionConfig, Probe, ProbeFitter
from myopia.tasks.base import PROBE_STREAM, batch_generator
from myopia.tasks.synthetic import SyntheticConfig, generate

_OFFSET = 2 * 10**6
"""Probe-stream batches from here on (``probe_model`` uses 0 and 10**6 onwards)."""


def fx_probes(task: SyntheticConfig, cfg: AttributionConfig, ridge: float, seed: int) -> ProbeFitter:
    """``fit_probes(model, layers)``: at each layer, the ridge probe for f(x_n) from that hidden state
    (every position), fitted on half of ``cfg.probe_sequences`` fresh sequences and scored (held-out
    centred R²) on the other half; its target at position t of a batch is f(x_t)."""
    half = max(8, cfg.probe_sequences // 2)

    def targets(x: torch.Tensor, y: torch.Tensor, position: int) -> torch.Tensor:
        return task.feature(x[:, position, 0].double())

    @torch.no_grad()
    def fit_probes(model: nn.Module, layers: list[int]) -> dict[int, list[Probe]]:
        device = next(model.parameters()).device
        stats = {layer: [] for layer in layers}
        for i in range(2):  # fit, score
            inp, _, xs = generate(task, half, batch_generator(seed, PROBE_STREAM, _OFFSET + i))
            _, hidden = model(inp.to(device), return_hidden_states=True)
            for layer in layers:
                s = ProbeStats(hidden[layer].shape[-1], 1)
                s.add(hidden[layer].float(), task.feature(xs).unsqueeze(-1))
                stats[layer].append(s)
        out = {}
        for layer, (train, test) in stats.items():
            fit = train.fit(ridge)
            out[layer] = [Probe("f(x_t)", fit.weight[:, 0], fit.bias[0], targets, float(test.r2(fit)[0]), "r2")]
        return out

    return fit_probes


__all__ = ["fx_probes"]
