"""``myopia sweep``: the language-modelling protocol over model sizes (paper §4.2, Pythia scaling).

Runs ``myopia lm`` once per model (same data, arms, optimiser settings in every arm, schedule and
seed) into ``out/<model>/`` and gathers every compared pair's gap (default: each arm against vanilla)
with its CI against the parameter count: ``results.json``, ``gap_vs_params.png`` and ``report.md``
beside the paper's Pythia gaps (for its myopic − vanilla pair).

Two Pythia presets: ``pythia-finetune`` is the paper's experiment (the released pretrained models
fine-tuned for one epoch on the first 64 tokens of hub documents; docs/pythia.md); ``pythia-shapes-scratch``
(alias ``pythia-scaling``) trains the same shapes from fresh weights, which the paper did not do.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace

from myopia.analysis.stats import format_ci
from myopia.config import ConfigError
from myopia.experiments import lm
from myopia.experiments.sweep import report
from myopia.experiments.sweep.config import PAPER_GAPS, SweepExperiment
from myopia.models.hf.presets import preset_for, preset_lr
from myopia.runs.arms import parse_arms
from myopia.runs.pairs import parse_pairs
from myopia.runs.results import Results, Status, recording
from myopia.tasks.text import TextTask


def _data(cfg: SweepExperiment):
    """The data config: document_starts reads one step's micro-batches as consecutive windows."""
    return cfg.data.for_grad_accum(cfg.train.grad_accum)


def _lm_config(cfg: SweepExperiment, model: str) -> lm.LMExperiment:
    base = {f.name: getattr(cfg, f.name) for f in fields(lm.LMExperiment)}
    optim = cfg.optim
    lr = preset_lr(model)
    if cfg.lr_from_preset > 0 and lr is not None:
        optim = replace(optim, lr=cfg.lr_from_preset * lr)
    safe = model.replace("/", "_").replace(":", "_")
    return lm.LMExperiment(**{**base, "hf_model": model, "optim": optim, "data": _data(cfg),
                              "out": os.path.join(cfg.out, safe)})


def _paper_gap(model: str) -> float | None:
    """The paper's held-out gap for a Pythia size (a shape or the released non-deduped model)."""
    return None if model.endswith("-deduped") else PAPER_GAPS.get(preset_for(model) or "")


def epoch_steps(cfg: SweepExperiment) -> tuple[SweepExperiment, dict | None]:
    """With ``epochs``: ``cfg`` with train.steps set to that many epochs over the training windows,
    and what was counted; else ``(cfg, None)``."""
    if not cfg.epochs:
        return cfg, None
    if cfg.data.windows != "document_starts":
        raise ConfigError(f"epochs={cfg.epochs}: an epoch is defined for --data.windows document_starts (each "
                          "document's first window once); set it, or --epochs 0 and --train.steps")
    if cfg.context_lengths:
        raise ConfigError("epochs: counts windows at data.seq_len, not at each of context_lengths; "
                          "use --epochs 0 and --train.steps with --context_lengths")
    windows = TextTask(_data(cfg), cfg.seed_list()[0]).epoch_windows
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps = cfg.epochs * windows // per_step
    if steps < 1:
        raise ConfigError(f"data.corpus: {windows} training windows (documents of >= data.seq_len+1 = "
                          f"{cfg.data.seq_len + 1} tokens) are fewer than one step's train.batch_size x "
                          f"train.grad_accum = {per_step}; use more documents or a smaller --train.batch_size")
    print(f"myopia sweep: {cfg.epochs} epoch(s) of {windows:,} document-start windows = {steps:,} steps of "
          f"{per_step} windows (unread, fewer than one step: {cfg.epochs * windows - steps * per_step})", flush=True)
    counted = {"epochs": cfg.epochs, "windows_per_epoch": windows, "steps": steps,
               "windows_unread": cfg.epochs * windows - steps * per_step}
    return replace(cfg, train=replace(cfg.train, steps=steps)), counted


def run(cfg: SweepExperiment) -> dict:
    if not cfg.models:
        raise ConfigError("models: name at least one model (e.g. pythia-14m,pythia-70m)")
    arms = parse_arms(cfg.arms, allow_local=True)
    if not parse_pairs(cfg.analysis.pairs, [a.name for a in arms], "analysis.pairs"):
        raise ConfigError("arms: the sweep measures gaps between arms; include vanilla in --arms (every arm is "
                          "compared with it) or name pairs with --analysis.pairs TREATMENT/BASELINE")
    cfg, epoch = epoch_steps(replace(cfg, data=_data(cfg)))  # the data and steps every model's run gets
    results = Results("sweep", cfg, body={"seeds": cfg.seed_list(), "models": [],
                                          **({"epoch": epoch} if epoch else {})})
    rows = results["models"]
    with recording(results, cfg.out):
        for model in cfg.models:
            sub = _lm_config(cfg, model)
            print(f"myopia sweep: {model} (lr {sub.optim.lr:g}) -> {sub.out}", flush=True)
            res = lm.run(sub)
            if res["status"] != Status.COMPLETED:
                break
            rows.append({"model": model, "parameters": res["parameters"], "lr": sub.optim.lr,
                         "arms": {k: v["loss"] for k, v in res["arms"].items()},
                         "comparisons": {label: {"treatment": c["treatment"], "baseline": c["baseline"],
                                                 "gap": c["gap"],
                                                 "position0_gap": c.get("first_position_gap", c["gap_per_position"][0])}
                                         for label, c in res["comparisons"].items()},
                         "paper_gap": _paper_gap(model)})
        data = results.write(cfg.out, Status.COMPLETED if len(rows) == len(cfg.models) else Status.INTERRUPTED)
    report.write(cfg.out, data)
    for r in rows:
        for label, c in r["comparisons"].items():
            print(f"  {r['model']:>14} ({r['parameters'] / 1e6:.1f}M): gap {label} {format_ci(c['gap'])}", flush=True)
    return data


__all__ = ["epoch_steps", "run"]
