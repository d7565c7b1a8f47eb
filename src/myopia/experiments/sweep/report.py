"""``myopia sweep``'s report: gap_vs_params.png and report.md beside the paper's Pythia gaps."""

from __future__ import annotations

import os

from myopia.analysis import plots
from myopia.analysis.stats import format_ci
from myopia.experiments import lm
from myopia.models.hf.presets import preset_for
from myopia.runs.pairs import PAPER_PAIR
from myopia.runs.results import write_report


def write(out: str, results: dict) -> None:
    """report.md and gap_vs_params.png from the sweep's results."""
    rows = results["models"]
    labels = list(dict.fromkeys(label for r in rows for label in r["comparisons"]))
    made = None
    plt = plots.pyplot() if rows else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label in labels:
            points = [(r["parameters"], r["comparisons"][label]["gap"]) for r in rows if label in r["comparisons"]]
            x = [p for p, _ in points]
            y = [g["mean"] for _, g in points]
            err = [[g["mean"] - (g["low"] if g["low"] is not None else g["mean"]) for _, g in points],
                   [(g["high"] if g["high"] is not None else g["mean"]) - g["mean"] for _, g in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{label} (95% CI)")
        paper = [(r["parameters"], r["paper_gap"]) for r in rows if r["paper_gap"] is not None]
        if paper and PAPER_PAIR.label in labels:
            ax.plot(*zip(*paper), "s--", color="grey", label="paper, myopic vs vanilla (Pythia, fine-tuned on the Pile)")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        plots.finish_axis(ax, "parameters", "gap, treatment - baseline (nats)", "Gap vs model size")
        made = plots.save_figure(fig, os.path.join(out, "gap_vs_params.png"))
    cfg = results["config"]
    data, train = cfg["data"], cfg["train"]
    per_step = train["batch_size"] * train.get("grad_accum", 1)
    epoch = results.get("epoch")
    if data.get("windows") == "document_starts":
        windows = (f"each document's first {data['seq_len'] + 1} tokens as one window (documents that long only)"
                   + (f", {epoch['epochs']} epoch(s) of {epoch['windows_per_epoch']:,} windows = " if epoch else ", "))
    else:
        windows = f"{data['seq_len']}-token windows, "
    fresh = [r["model"] for r in rows if preset_for(r["model"]) == r["model"]]
    text = ["# Myopia gap across model sizes (Wu et al. 2024, §4.2)", "",
            f"Corpus {data['corpus']}, tokenizer {data['tokenizer']}, {windows}"
            f"{train['steps']} steps of {per_step} windows per arm{lm.start_text(cfg)}; "
            "every arm of a model shares "
            "every optimiser setting (the paper's myopic Pythia arm silently ran another learning rate). "
            f"Intervals: 95% CI {lm.ci_text(len(results['seeds']))}"
            + (" (`--seeds 0,1,2` for intervals over seeds)." if len(results["seeds"]) == 1 else ".")
            + (" A preset name with fresh weights is the published shape; its parameter count includes the "
               "embedding sized to this tokenizer, and the paper's gaps are for the released, fully trained models "
               "(myopic − vanilla only)." if fresh else
               " Every model starts from its pretrained weights (fine-tuning, as the paper's Pythia runs); the "
               "paper's gaps are myopic − vanilla only, on one held-out batch of 32 sequences."), "",
            "| model | parameters | lr | treatment − baseline | treatment CE | baseline CE | gap [95% CI] | "
            "position-0 gap | paper gap |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for label, c in r["comparisons"].items():
            paper = r["paper_gap"] if r["paper_gap"] is not None and label == PAPER_PAIR.label else "-"
            text.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['lr']:g} | {c['treatment']} − "
                        f"{c['baseline']} | {format_ci(r['arms'][c['treatment']])} | "
                        f"{format_ci(r['arms'][c['baseline']])} | {format_ci(c['gap'])} | "
                        f"{format_ci(c['position0_gap'])} | {paper} |")
    if made:
        text += ["", "![gap vs parameters](gap_vs_params.png)"]
    write_report(out, text)


__all__ = ["write"]
