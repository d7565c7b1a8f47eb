"""Per-feature pre-caching attribution measured while an experiment trains: which part of each arm's
own training gradient (direct, pre-cached, shared: :mod:`myopia.analysis.attribution`) moves a probed
feature of the residual stream towards its values, at chosen steps, layers and positions. The arms'
records go to their ``metrics.jsonl`` under ``feature_attribution``; :func:`collect` gathers them for
``results.json``, :func:`plot` draws them over training and :func:`report_lines` tabulates them.

The experiment supplies the features: ``fit_probes(model, layers)`` fits, on the model as it is at
that step, the probes to score at each layer, each with the values it should read on the split's
examples at a position: the synthetic task's ridge probe for f(x_n), the language experiment's
future-token probes (docs/attribution.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from myopia.analysis import plots
from myopia.analysis.attribution import (
    PARTS,
    adam_preconditioner,
    feature_pushes,
    model_cut,
    precached_is_zero_by_construction,
    residual_blocks,
    split_gradient,
)
from myopia.analysis.gradients import log_spaced_steps
from myopia.config import ConfigError
from myopia.tasks.base import loss_mask
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.distributed import sharded_across_ranks
from myopia.train.layout import metrics_path
from myopia.train.loop import MetricsLog
from myopia.train.optim import lr_at

KEY = "feature_attribution"
"""The key of the records in ``metrics.jsonl`` and of the gathered results in ``results.json``."""
LR_KEY = "feature_attribution_lr_until_next"
"""The key, beside :data:`KEY` in ``metrics.jsonl``, of the learning rate summed over the updates from
a measurement to the next (:func:`lr_until_next`)."""


@dataclass
class AttributionConfig:
    """Per-feature pre-caching attribution during training (off unless layers and positions are set)."""

    layers: list[int] = field(default_factory=list)
    """States to split at: the residual stream entering block L (hidden state L; layer 1 = after
    block 0). Empty = off."""
    positions: list[int] = field(default_factory=list)
    """Positions t of those states (the last position has no pre-cached part by definition)."""
    batch_size: int = 64
    """Held-out sequences (the task's held-out batch 0) whose gradient is split."""
    probe_sequences: int = 512
    """Fresh sequences to fit each measured step's feature probe on (half of them score it)."""
    every: int = 0
    """Measure at steps 0, 1, 2, 4, 8, ..., every ``every`` steps and at the end (0 = the training's
    eval_every)."""

    def __post_init__(self) -> None:
        if bool(self.layers) != bool(self.positions):
            raise ValueError("attribution: set both layers and positions (or neither, to switch it off)")
        if any(v < 0 for v in (*self.layers, *self.positions)):
            raise ValueError("attribution: layers and positions must be >= 0")
        if self.batch_size < 1 or self.probe_sequences < 16 or self.every < 0:
            raise ValueError("attribution: batch_size must be >= 1, probe_sequences >= 16 and every >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def check_sites(self, n_blocks: int | None, blocks_named: str, seq_len: int | None, seq_len_named: str) -> None:
        """One-line errors for a layer at or past ``n_blocks`` or a position at or past ``seq_len``
        (either None: not known yet), the limits named as the user knows them (e.g. model.n_layer)."""
        if n_blocks is not None and (bad := [layer for layer in self.layers if layer >= n_blocks]):
            raise ConfigError(f"attribution.layers: {bad} must be below {n_blocks} ({blocks_named}; the state "
                              "entering block L is split; layer 1 is the residual stream after block 0)")
        if seq_len is not None and (bad := [t for t in self.positions if t >= seq_len]):
            raise ConfigError(f"attribution.positions: {bad} must be below {seq_len} ({seq_len_named})")


@dataclass
class Probe:
    """A linear read-out of a state, fitted on the model as it is: ``weightᵀh + bias`` should equal
    :meth:`targets` (one direction, or k scored together, e.g. a multi-class probe's classes)."""

    name: str
    weight: torch.Tensor
    """``(d,)`` or ``(d, k)``."""
    bias: torch.Tensor
    """``()`` or ``(k,)``."""
    targets: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | None]
    """``targets(x, y, position)``: the values the probe should read at ``position`` of the batch
    (``(B,)`` or ``(B, k)``), or None where it has none there (a future token past the window)."""
    quality: float | None = None
    """How well it reads them on held-out data (:attr:`metric`)."""
    metric: str = "r2"


ProbeFitter = Callable[[nn.Module, list[int]], dict[int, list[Probe]]]
"""``fit_probes(model, layers)``: the probes to score at each layer, fitted on ``model`` now."""


def _per_position_losses(task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-position losses whose mean is the training loss (:func:`myopia.tasks.base.mean_loss`)."""

    def losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_position = task.loss_per_position(out, y)
        mask = loss_mask(task, y)
        if mask is None:
            return per_position
        return torch.where(mask, per_position, 0.0) * (mask.numel() / mask.sum().clamp(min=1))

    return losses


def measure(model: nn.Module, task, cfg: AttributionConfig, fit_probes: ProbeFitter,
            optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
    """One measurement: for every configured layer and position, the split of the model's own
    training gradient (its attention cut as it is) on the task's held-out batch 0, and each
    probe's pushes towards its targets: ``sgd`` (a plain step) and ``adam`` (AdamW's step with ``optimizer``'s
    current moments; None before its first step), and whether the model's cut makes the pre-cached
    part zero by construction there. The model is left as it was (eval mode meanwhile, so no dropout
    or RNG is used; ``.grad`` untouched; its cut restored after each split)."""
    device = next(model.parameters()).device
    x, y = task.heldout_batch(0, cfg.batch_size)
    x, y = x.to(device), y.to(device)
    losses = _per_position_losses(task)
    params = [p for p in model.parameters() if p.requires_grad]
    cut, n_blocks = model_cut(model), len(residual_blocks(model))
    pre = adam_preconditioner(optimizer, params) if optimizer is not None else None  # the same at every site
    was_training = model.training
    model.eval()
    records = []
    try:
        probes = fit_probes(model, list(cfg.layers))
        for layer in cfg.layers:
            for position in cfg.positions:
                wanted = [(p, t) for p in probes[layer] if (t := p.targets(x, y, position)) is not None]
                if not wanted:
                    continue
                split = split_gradient(model, x, y, losses, layer, position, params)
                for probe, t in wanted:
                    w = probe.weight.to(split.values.device)
                    t = t.to(split.values.device) - probe.bias.to(split.values.device)
                    records.append({
                        "layer": layer, "position": position, "feature": probe.name,
                        "probe": {probe.metric: probe.quality},
                        "sgd": feature_pushes(split, w, targets=t),
                        "adam": feature_pushes(split, w, pre, t) if pre else None,
                        "precached_zero_by_construction":
                            cut is not None and precached_is_zero_by_construction(cut, layer, n_blocks)})
                del split
    finally:
        model.train(was_training)
    return records


def _measured(step: int, every: int, train: TrainConfig) -> bool:
    return log_spaced_steps(step, every) or step == train.steps


def lr_until_next(step: int, cfg: AttributionConfig, train: TrainConfig, optim: OptimConfig) -> float:
    """The learning rate summed over the updates from measured step ``step`` to the next measurement
    (0 at the last step): what turns a push per unit learning rate into the change it stands for until
    the next measurement."""
    every = cfg.every or train.eval_every
    total = 0.0
    for u in range(step, train.steps):
        if u > step and _measured(u, every, train):
            break
        total += lr_at(u, train.steps, optim)
    return total


def monitor(task, cfg: AttributionConfig, train: TrainConfig, fit_probes: ProbeFitter, *,
            optim: OptimConfig) -> Callable:
    """A training-loop monitor (``train_arm``'s ``monitor``) that :func:`measure`\\ s at the configured
    steps and returns ``{"feature_attribution": records, "feature_attribution_lr_until_next": Σ lr}``
    (``optim``: the arm's optimiser settings, for its learning-rate schedule)."""
    every = cfg.every or train.eval_every

    def watch(model: nn.Module, step: int, optimizer=None) -> dict | None:
        if not _measured(step, every, train):
            return None
        return {KEY: measure(model, task, cfg, fit_probes, optimizer), LR_KEY: lr_until_next(step, cfg, train, optim)}

    return watch


def monitor_factory(task, cfg: AttributionConfig, train: TrainConfig, fit_probes: ProbeFitter, *,
                    optim: OptimConfig) -> Callable | None:
    """``monitor_for(arm, model)`` for ``run_arms``: :func:`monitor` for every arm but local-myopic ones
    (their wrapper has no blocks of its own to split at), after a one-line error for a layer the model
    does not have; or None when off (no sites, or FSDP over several ranks: the bare model's parameters
    are shards there)."""
    if not cfg.enabled or sharded_across_ranks(train.parallel):
        return None
    watch = monitor(task, cfg, train, fit_probes, optim=optim)

    def monitor_for(arm, model):
        if arm.local:
            return None
        cfg.check_sites(len(residual_blocks(model)), "the model's blocks", None, "")
        return watch

    return monitor_for


def merge_factories(*factories: Callable | None) -> Callable | None:
    """One ``monitor_for(arm, model)`` from several (e.g. the gradient split's and this one), None if
    none is given."""
    present = [f for f in factories if f is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def monitor_for(arm, model):
        return combine(*(f(arm, model) for f in present))

    return monitor_for


def combine(*monitors: Callable | None) -> Callable | None:
    """One monitor running each given one in turn and merging their records (None if none is given)."""
    present = [m for m in monitors if m is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def watch(model: nn.Module, step: int, optimizer=None) -> dict | None:
        out: dict = {}
        for m in present:
            out.update(m(model, step, optimizer) or {})
        return out or None

    return watch


def read_trajectory(arm_dir: str) -> list[dict]:
    """``[{"step": s, "sites": records, "lr_until_next": Σ lr}, ...]`` from an arm's metrics (empty if
    not measured; ``lr_until_next`` None in records written before it was kept)."""
    return [{"step": r["step"], "sites": r[KEY], "lr_until_next": r.get(LR_KEY)}
            for r in MetricsLog(metrics_path(arm_dir), enabled=False).read() if KEY in r]


def collect(run_dirs: dict[str, str]) -> dict | None:
    """``{"runs": {label: trajectory}, "summary": {label: {...}}}`` for the labelled arm folders that
    were measured, or None if none was."""
    runs = {label: t for label, path in run_dirs.items() if (t := read_trajectory(path))}
    if not runs:
        return None
    return {"runs": runs, "summary": {label: summarise(t) for label, t in runs.items()}}


def _site(r: dict) -> str:
    return f"layer {r['layer']} position {r['position']} {r['feature']}"


def summarise(trajectory: list[dict]) -> dict:
    """Per site (layer, position, feature): the plain-step pushes integrated over training, each
    measurement's push times the learning rate summed over the updates until the next one (the decrease
    of the feature's squared error that plain steps along each part would have made, at the measured
    gradients; None where a measurement lacks that sum), their pre-caching score; the largest single
    pre-cached push and its step; and whether the arm's cut makes the pre-cached part zero by
    construction there."""
    out: dict = {}
    weighted = all(entry.get("lr_until_next") is not None for entry in trajectory)
    for entry in trajectory:
        for r in entry["sites"]:
            s = out.setdefault(_site(r), {"layer": r["layer"], "position": r["position"], "feature": r["feature"],
                                          "integral": dict.fromkeys(PARTS, 0.0) if weighted else None,
                                          "max_precached": -math.inf, "max_precached_step": None,
                                          "precached_zero_by_construction": True})
            if weighted:
                for part in PARTS:
                    s["integral"][part] += r["sgd"][part] * entry["lr_until_next"]
            if r["sgd"]["precached"] > s["max_precached"]:
                s["max_precached"], s["max_precached_step"] = r["sgd"]["precached"], entry["step"]
            s["precached_zero_by_construction"] &= bool(r.get("precached_zero_by_construction"))
    for s in out.values():
        s["precaching_score"] = None if s["integral"] is None else _score(s["integral"])
    return out


def _score(pushes: dict) -> float:
    through = abs(pushes["direct"]) + abs(pushes["precached"])
    return pushes["precached"] / through if through > 0 else 0.0


def _running_integral(runs: list[dict], site: str) -> tuple[list[int], list[float], list[float], list[dict]]:
    """For one site of a run, at each measurement that has it: step + 1, the pre-cached and direct
    plain-step pushes integrated from step 0 up to that step (NaN after a measurement without its
    learning-rate sum), and the probe's record."""
    xs, pre, direct, probes = [], [], [], []
    pre_sum = direct_sum = 0.0
    for e in runs:
        r = next((r for r in e["sites"] if _site(r) == site), None)
        if r is None:
            continue
        xs.append(e["step"] + 1)
        pre.append(pre_sum)
        direct.append(direct_sum)
        probes.append(r["probe"])
        lr = math.nan if e.get("lr_until_next") is None else e["lr_until_next"]
        pre_sum += r["sgd"]["precached"] * lr
        direct_sum += r["sgd"]["direct"] * lr
    return xs, pre, direct, probes


def plot(attribution: dict, path: str) -> str | None:
    """Per run (colour) and site (shade), against the step: the pre-cached (solid) and direct (dotted)
    plain-step pushes on each feature integrated from step 0 (left; :func:`summarise`'s weighting: a
    single measurement is one batch and swings in sign, the integral shows which part trains the
    feature over training), and each probe's held-out quality as fitted at that step (right)."""
    plt = plots.pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shades: dict[str, None] = {}
    metrics: dict[str, None] = {}
    for i, (label, runs) in enumerate(attribution["runs"].items()):
        colour = colours[i % len(colours)]
        sites = dict.fromkeys(_site(r) for e in runs for r in e["sites"])
        for j, site in enumerate(sites):
            alpha = 1.0 - 0.6 * j / max(1, len(sites) - 1)
            xs, pre, direct, probes = _running_integral(runs, site)
            quality = []
            for probe in probes:
                metric, value = next(iter(probe.items()))
                metrics[metric] = None
                quality.append(math.nan if value is None else value)
            first = j == 0  # one legend entry per run; the shade tells the sites apart
            left.plot(xs, pre, "-", color=colour, alpha=alpha, lw=1.3, label=f"{label}: pre-cached" if first else None)
            left.plot(xs, direct, ":", color=colour, alpha=alpha, lw=1.1, label=f"{label}: direct" if first else None)
            right.plot(xs, quality, "o-", ms=2.5, color=colour, alpha=alpha, lw=1.1, label=label if first else None)
        shades.update(sites)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("step + 1")
        ax.grid(alpha=0.3)
    left.axhline(0, color="black", lw=0.8)
    left.set_ylabel("push towards the feature's values × lr, integrated")
    left.set_title("Which gradient part trains the feature (plain step)")
    left.legend(frameon=False, fontsize=6)
    right.set_ylabel("probe " + " / ".join(metrics) + " (held out)")
    right.set_title("The feature in the model")
    right.legend(frameon=False, fontsize=6)
    if len(shades) > 1:
        fig.text(0.5, 0.005, "darkest to lightest: " + "; ".join(shades), ha="center", fontsize=7)
    return plots.save_figure(fig, path)


def plot_by_layer(attribution: dict, label: str, step: int, path: str) -> str | None:
    """One measurement of run ``label``, against the layer: each probe's pre-cached and direct
    pushes (plain step) at each position (left) and its pre-caching score (right)."""
    plt = plots.pyplot()
    entry = next((e for e in attribution["runs"].get(label, []) if e["step"] == step), None)
    if plt is None or entry is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = dict.fromkeys((r["feature"], r["position"]) for r in entry["sites"])
    for i, (feature, position) in enumerate(series):
        rows = sorted((r for r in entry["sites"] if (r["feature"], r["position"]) == (feature, position)),
                      key=lambda r: r["layer"])
        layers = [r["layer"] for r in rows]
        colour = colours[i % len(colours)]
        tag = f"{feature} at t={position}"
        left.plot(layers, [r["sgd"]["precached"] for r in rows], "o-", ms=3, color=colour, label=f"{tag}: pre-cached")
        left.plot(layers, [r["sgd"]["direct"] for r in rows], "x:", ms=3, color=colour, label=f"{tag}: direct")
        right.plot(layers, [r["sgd"]["precaching_score"] for r in rows], "o-", ms=3, color=colour, label=tag)
    for ax in (left, right):
        ax.set_xlabel("layer L (residual stream entering block L)")
        ax.grid(alpha=0.3)
        ax.axhline(0, color="black", lw=0.8)
    # linear within a tenth of the largest pre-cached push: the pushes that rank the layers read as
    # numbers, while a much larger direct push still fits
    largest = max((abs(r["sgd"]["precached"]) for r in entry["sites"]), default=0.0)
    left.set_yscale("symlog", linthresh=largest / 10 if largest > 0 else 1e-6)
    left.set_ylabel("push towards the feature's values (plain step)")
    left.set_title(f"{label}, step {step}")
    left.legend(frameon=False, fontsize=7)
    right.set_ylim(-1.05, 1.05)
    right.set_ylabel("pre-caching score")
    right.set_title("pre-cached / (|direct| + |pre-cached|)")
    right.legend(frameon=False, fontsize=7)
    return plots.save_figure(fig, path)


def step_lines(attribution: dict, label: str, step: int) -> list[str]:
    """The report's per-layer table of one measurement of run ``label`` (by probe, position and layer),
    then the three largest pre-cached pushes."""
    entry = next((e for e in attribution["runs"].get(label, []) if e["step"] == step), None)
    if entry is None:
        return []
    lines = [f"## Per-feature attribution by layer: {label}, step {step}", "",
             "| layer | position | probe | probe quality | direct | pre-cached | shared | score | AdamW score |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(entry["sites"], key=lambda r: (r["feature"], r["position"], r["layer"])):
        quality = ", ".join(f"{k} {v:.3f}" for k, v in r["probe"].items() if v is not None)
        adam = f"{r['adam']['precaching_score']:+.2f}" if r["adam"] else "-"
        lines.append(f"| {r['layer']} | {r['position']} | {r['feature']} | {quality} | {r['sgd']['direct']:.3g} | "
                     f"{r['sgd']['precached']:.3g} | {r['sgd']['shared']:.3g} | "
                     f"{r['sgd']['precaching_score']:+.2f} | {adam} |")
    top = sorted(entry["sites"], key=lambda r: -r["sgd"]["precached"])[:3]
    if top:
        lines += ["", "Largest pre-cached pushes: " + "; ".join(
            f"layer {r['layer']} ({r['feature']}, t={r['position']}: {r['sgd']['precached']:.3g})" for r in top) + "."]
    return lines + [""]


def report_lines(attribution: dict) -> list[str]:
    """The report's table: per run and site, the plain-step pushes integrated over training
    (:func:`summarise`), the pre-cached one marked where the arm's cut makes it zero by construction,
    and the largest single pre-cached push."""
    rows = [(label, s) for label, sites in attribution["summary"].items() for s in sites.values()]
    lines = ["## Per-feature attribution: which gradient part trains the probed feature", "",
             "Each arm's own training gradient on held-out batch 0, split at the residual stream entering "
             "block L at position t: direct (from L_t), pre-cached (from later losses L_s, s > t) and shared "
             "(not through that state). A part's push is the first-order move of the probe's reading towards "
             "the feature's true values under a plain step along that part, per unit learning rate. The table "
             "integrates it over training: each measurement's push times the learning rate summed over the "
             "updates until the next measurement, i.e. how far plain steps along that part, at the measured "
             "gradients, would have moved the reading (not what AdamW did). "
             "Score = pre-cached / (|direct| + |pre-cached|)."]
    if any(s.get("precached_zero_by_construction") for _, s in rows):
        lines[-1] += (" \"0 (by construction)\": the arm's cut (myopic or myopic_kv with β = 0 and no horizon, or "
                      "bigram, in every block from L on) leaves no path from later losses to the state; under "
                      "myopic@β, a horizon or a cut that leaves a later block vanilla the pre-cached part is "
                      "measured like any other.")
    lines += ["", "| run | layer | position | feature | direct | pre-cached | score | largest pre-cached push (step) |",
              "|---|---|---|---|---|---|---|---|"]
    for label, s in rows:
        integral = s.get("integral") or {}
        direct, precached = (f"{integral[p]:.3g}" if integral else "-" for p in ("direct", "precached"))
        if s.get("precached_zero_by_construction"):
            precached = "0 (by construction)"
        score = "-" if s.get("precaching_score") is None else f"{s['precaching_score']:+.2f}"
        lines.append(f"| {label} | {s['layer']} | {s['position']} | {s['feature']} | {direct} | {precached} | "
                     f"{score} | {s['max_precached']:.3g} ({s['max_precached_step']}) |")
    return lines + [""]


__all__ = ["KEY", "LR_KEY", "AttributionConfig", "Probe", "ProbeFitter", "collect", "combine", "lr_until_next",
           "measure", "merge_factories", "monitor", "monitor_factory", "plot",
           "plot_by_layer", "read_trajectory", "report_lines", "step_lines", "summarise"]
