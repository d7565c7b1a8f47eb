"""Gap vs context length: ``myopia lm --context_lengths 64,256,1024`` runs the experiment once per
window length T in ``<out>/T<T>/``, with equal tokens per step (batch ∝ 1/T) and one model (its
context sized to the largest T, so every run has the same parameters), then gathers every compared
pair's gap per T and its gap by *relative* position (t / T in equal bins): ``results.json``,
``gap_vs_context.png`` and ``report.md``."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from myopia.analysis import plots
from myopia.analysis.stats import format_ci, mean_ci
from myopia.config import ConfigError
from myopia.experiments.lm.config import LMExperiment
from myopia.experiments.lm.single import run_single
from myopia.runs.results import Results, Status, recording, write_report

BINS = 8
"""Relative-position bins of the gap (each 1/8 of the window)."""


def sub_config(cfg: LMExperiment, T: int) -> LMExperiment:
    """The run at window ``T``: batch (and probe training windows) scaled to keep cfg's tokens per step
    (and probe tokens), output in ``<out>/T<T>``."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    if tokens % T:
        raise ConfigError(f"context_lengths: {T} does not divide train.batch_size x data.seq_len = {tokens} tokens per "
                          f"step; choose lengths that divide it (or change the batch)")
    probe_windows = max(1, cfg.analysis.probe_train_windows * cfg.data.seq_len // T)  # equal probe tokens too
    return replace(cfg, context_lengths=[], out=os.path.join(cfg.out, f"T{T}"),
                   data=replace(cfg.data, seq_len=T), train=replace(cfg.train, batch_size=tokens // T),
                   analysis=replace(cfg.analysis, probe_train_windows=probe_windows))


def relative_bins(per_position: list[dict], bins: int = BINS) -> list[float]:
    """Mean gap over each 1/bins of the window's positions."""
    values = np.array([g["mean"] for g in per_position])
    edges = np.linspace(0, len(values), bins + 1).round().astype(int)
    return [float(values[a:b].mean()) if b > a else float("nan") for a, b in zip(edges[:-1], edges[1:])]


def gather(res: dict) -> dict:
    """One window length's summary from its lm results."""
    entry = {"seq_len": res["config"]["data"]["seq_len"], "batch_size": res["config"]["train"]["batch_size"],
             "parameters": res.get("parameters"), "ci_over": res.get("ci_over"), "start": res.get("start"),
             "arms": {n: a["loss"] for n, a in res.get("arms", {}).items()}, "comparisons": {}}
    for label, c in res.get("comparisons", {}).items():
        per_seed = [r["comparisons"][label]["gap_per_position"] for r in res["per_seed"].values()]
        by_seed = [relative_bins(p) for p in per_seed]
        rel = ([mean_ci([b[i] for b in by_seed]) for i in range(BINS)] if len(by_seed) > 1
               else [{"mean": v, "low": None, "high": None, "n": 1} for v in by_seed[0]])
        entry["comparisons"][label] = {"treatment": c["treatment"], "baseline": c["baseline"], "gap": c["gap"],
                                       "gap_by_relative_position": rel}
    return entry


def run_context(cfg: LMExperiment) -> dict:
    """The experiment once per window length in ``cfg.context_lengths``, gathered (module docstring)."""
    lengths = sorted(set(cfg.context_lengths))
    subs = [sub_config(cfg, T) for T in lengths]  # every length checked before anything trains
    results = Results("lm", cfg, body={"seeds": cfg.seed_list(), "context_lengths": {}})
    with recording(results, cfg.out):
        for T, sub in zip(lengths, subs):
            print(f"myopia lm: context length {T} (batch {sub.train.batch_size}) -> {sub.out}", flush=True)
            res = run_single(sub, block_size=max(lengths))
            if res["status"] != Status.COMPLETED:
                return results.write(cfg.out, Status(res["status"]))
            results["context_lengths"][str(T)] = {"results": os.path.relpath(os.path.join(sub.out, "results.json"),
                                                                             cfg.out), **gather(res)}
        data = results.write(cfg.out, Status.COMPLETED)
    write_context_report(cfg.out, data)
    for T, e in data["context_lengths"].items():
        for label, c in e["comparisons"].items():
            print(f"  T={T:>5}: gap {label} {format_ci(c['gap'])}", flush=True)
    return data


def plot(results: dict, path: str) -> str | None:
    plt = plots.pyplot()
    entries = results["context_lengths"]
    if plt is None or not entries:
        return None
    labels = list(dict.fromkeys(label for e in entries.values() for label in e["comparisons"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        pts = [(int(T), e["comparisons"][label]["gap"]) for T, e in entries.items() if label in e["comparisons"]]
        err = [[g["mean"] - (g["low"] if g["low"] is not None else g["mean"]) for _, g in pts],
               [(g["high"] if g["high"] is not None else g["mean"]) - g["mean"] for _, g in pts]]
        left.errorbar([T for T, _ in pts], [g["mean"] for _, g in pts], yerr=err, marker="o", capsize=3,
                      label=f"{label} (95% CI)")
    left.axhline(0, color="black", lw=0.8)
    left.set_xscale("log", base=2)
    left.set_xticks([int(T) for T in entries])
    left.set_xticklabels(list(entries))
    plots.finish_axis(left, "context length T (tokens per step held equal)", "gap, treatment − baseline (nats)", "Gap vs context length")
    centres = (np.arange(BINS) + 0.5) / BINS
    for T, e in entries.items():
        for label in labels[:1] if len(labels) > 1 else labels:
            if label in e["comparisons"]:
                right.plot(centres, [g["mean"] for g in e["comparisons"][label]["gap_by_relative_position"]],
                           marker="o", label=f"T={T}")
    right.axhline(0, color="black", lw=0.8)
    plots.finish_axis(right, "relative position t / T", "gap (nats)", f"Gap by relative position ({labels[0] if labels else ''})")
    return plots.save_figure(fig, path)


def write_context_report(out: str, results: dict) -> None:
    cfg = results["config"]
    entries = results["context_lengths"]
    made = plot(results, os.path.join(out, "gap_vs_context.png"))
    tokens = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    text = ["# Gap vs context length", "",
            f"One model ({cfg['model']['n_layer']} layers, d={cfg['model']['n_embd']}, context "
            f"{max(int(T) for T in entries) if entries else '-'}) trained at each window length T with "
            f"{tokens} tokens per step (batch × T), {cfg['train']['steps']} steps per arm, corpus "
            f"{cfg['data']['corpus']}; seeds {', '.join(map(str, results['seeds']))}. Each T's full report: "
            "`T<T>/report.md`.", "",
            "| T | batch | treatment − baseline | gap [95% CI] | " +
            " | ".join(f"{i}/{BINS}-{i + 1}/{BINS}" for i in range(BINS)) + " |",
            "|---|---|---|---|" + "---|" * BINS]
    for T, e in entries.items():
        for label, c in e["comparisons"].items():
            text.append(f"| {T} | {e['batch_size']} | {c['treatment']} − {c['baseline']} | {format_ci(c['gap'])} | "
                        + " | ".join(f"{g['mean']:+.4f}" for g in c["gap_by_relative_position"]) + " |")
    start = next(iter(entries.values()), {}).get("start") or {}
    text += ["", "Columns after the gap: the mean gap over each eighth of the window (relative position t / T). "
             "Intervals: " + ("over seeds" + (", conditional on one pretrained start per T (pretraining variance "
                                               "not included)" if start.get("conditional_on_one_start") else
                                               ", each seed with its own pretrained start per T"
                                               if start.get("kind") == "pretrained_per_seed" else "")
                              if len(results["seeds"]) > 1 else "by bootstrap over held-out documents (one seed)") + "."]
    if made:
        text += ["", "![gap vs context length](gap_vs_context.png)"]
    write_report(out, text)


__all__ = ["BINS", "gather", "relative_bins", "run_context", "sub_config", "write_context_report"]
