"""The language experiment's features for per-feature attribution: future-token probes (from a layer's
state at t, the token at t+k, over the most frequent tokens and 'other'), refitted on the model as it
is at every measurement (:mod:`myopia.runs.feature_attribution`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from myopia.analysis.probes import ProbeStats
from myopia.experiments.lm.analysis import token_classes
from myopia.runs.feature_attribution import AttributionConfig, Probe, ProbeFitter

_FIRST_STEP = 2 * 10**7
"""The probes are fitted on the training batches of steps from here on (a pure function of the step;
the analysis's probes use 10**7 onwards, training far fewer)."""


def _tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, y[:, -1:]], dim=1)  # tokens 0..T


def future_token_probes(task, offsets: list[int], n_classes: int, cfg: AttributionConfig) -> ProbeFitter:
    """``fit_probes(model, layers)``: at each layer and offset k, the ridge probe from the state at t
    to the one-hot class of the token at t+k (``n_classes``: the most frequent tokens and 'other'),
    fitted on half of ``cfg.probe_sequences`` training windows (held-out accuracy on the other half).
    Scored together over its classes: its push is the move of the probe's k-class reading towards the
    one-hot of the true future token."""
    lookup = token_classes(task, n_classes)
    T = task.seq_len
    offsets = [k for k in offsets if 0 < k < T]
    half = max(2, cfg.probe_sequences // 2)

    def targets_for(k: int):
        def targets(x: torch.Tensor, y: torch.Tensor, position: int) -> torch.Tensor | None:
            if position + k > T:
                return None
            return F.one_hot(lookup[_tokens(x, y)[:, position + k].cpu()], n_classes).double()

        return targets

    def windows(first: int):
        for i in range(first, first + half, 16):
            yield task.train_batch(_FIRST_STEP + i, 0, min(16, first + half - i))

    @torch.no_grad()
    def fit_probes(model: nn.Module, layers: list[int]) -> dict[int, list[Probe]]:
        device = next(model.parameters()).device
        stats: dict = {}
        for x, y in windows(0):
            _, hidden = model(x.to(device), return_hidden_states=True)
            classes = lookup[_tokens(x, y)]
            for layer in layers:
                for k in offsets:
                    if (layer, k) not in stats:
                        stats[(layer, k)] = ProbeStats(hidden[layer].shape[-1], n_classes)
                    stats[(layer, k)].add(hidden[layer][:, : T + 1 - k].float(), F.one_hot(classes[:, k:], n_classes))
        fits = {key: s.fit(1e-3) for key, s in stats.items()}
        correct, total = dict.fromkeys(fits, 0), dict.fromkeys(fits, 0)
        for x, y in windows(half):  # held-out accuracy of each probe
            _, hidden = model(x.to(device), return_hidden_states=True)
            classes = lookup[_tokens(x, y)]
            for (layer, k), fit in fits.items():
                pred = fit.predict(hidden[layer][:, : T + 1 - k].float().cpu()).argmax(-1)
                correct[(layer, k)] += int((pred == classes[:, k:]).sum())
                total[(layer, k)] += pred.numel()
        return {layer: [Probe(f"token t+{k}", fits[(layer, k)].weight, fits[(layer, k)].bias, targets_for(k),
                              correct[(layer, k)] / max(1, total[(layer, k)]), "accuracy") for k in offsets]
                for layer in layers}

    return fit_probes


__all__ = ["future_token_probes"]
