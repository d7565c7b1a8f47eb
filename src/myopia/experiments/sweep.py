"""``myopia sweep``: the language-modelling protocol over model sizes (paper §4.2, Pythia scaling).

Runs ``myopia lm`` once per model (same data, arms, optimiser settings in every arm, schedule and
seed) into ``out/<model>/`` and gathers every compared pair's gap (default: each arm against vanilla)
with its CI against the parameter count: ``results.json``, ``gap_vs_params.png`` and ``report.md``
beside the paper's Pythia gaps (for its myopic − vanilla pair).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

from myopia.analysis import plots
from myopia.analysis.stats import format_ci
from myopia.config import ConfigError
from myopia.experiments import lm
from myopia.experiments.arms import parse_arms
from myopia.experiments.pairs import PAPER_PAIR, parse_pairs
from myopia.experiments.scaffold import Results, Status, recording, write_report
from myopia.hf_models import HF_PRESETS

# Held-out myopia gap per Pythia size in the paper (one 32-sequence batch; §4.2 of our notes).
PAPER_GAPS = {"pythia-14m": 0.157, "pythia-31m": 0.113, "pythia-70m": 0.057, "pythia-160m": 0.118,
              "pythia-410m": 0.119, "pythia-1b": 0.162, "pythia-1.4b": 0.170, "pythia-2.8b": 0.249}


@dataclass
class SweepExperiment(lm.LMExperiment):
    """The myopia gap across model sizes: one `myopia lm` run per model, gathered in one table and plot."""

    models: list[str] = field(default_factory=lambda: ["pythia-14m", "pythia-31m", "pythia-70m"])
    """Models, smallest first: Hugging Face presets, local checkpoint directories or hf:NAME."""
    lr_from_preset: float = 0.0
    """If > 0, each preset model trains at this multiple of its authors' learning rate (the paper
    fine-tuned Pythia at 0.4×); 0 = optim.lr for every model. Both arms always share it."""


PRESETS: dict[str, dict] = {
    # The paper's Pythia scaling protocol on the built-in corpus (a GPU run; weights are fresh unless
    # `models` names local checkpoint directories of the released Pythia models).
    "pythia-scaling": {
        "out": "runs/sweep-pythia",
        "models": ["pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b",
                   "pythia-1.4b", "pythia-2.8b"],
        "arms": ["vanilla", "myopic"], "lr_from_preset": 0.4,
        "data": {"corpus": "builtin", "tokenizer": "gpt-neox", "seq_len": 64},
        "optim": {"weight_decay": 0.01, "warmup": 0.05},
        "train": {"steps": 2000, "batch_size": 256, "eval_every": 500, "eval_batches": 16, "checkpoint_every": 500},
    },
    # ~20 minutes on 2 CPU cores: the two smallest Pythia shapes (embedding sized to a 4k BPE), each
    # pretrained vanilla for 800 steps, then fine-tuned vanilla and myopic for 200 steps, seeds 0, 1
    # (docs/lm.md: it shows the machinery; at this budget the larger shape is the worse model).
    "cpu": {
        "out": "runs/sweep-cpu",
        "models": ["pythia-14m", "pythia-31m"],
        "arms": ["vanilla", "myopic"], "seeds": [0, 1],
        "data": {"corpus": "builtin", "tokenizer": "bpe", "vocab_size": 4096, "seq_len": 64},
        "pretrain": {"steps": 800, "lr": 3e-3},
        "optim": {"lr": 1e-3},
        "train": {"steps": 200, "batch_size": 16, "eval_every": 400, "eval_batches": 8, "checkpoint_every": 400,
                  "log_every": 25},
        "analysis": {"heldout_windows": 500, "bootstrap": 500, "probe_train_windows": 200},
    },
}


def _lm_config(cfg: SweepExperiment, model: str) -> lm.LMExperiment:
    base = {f.name: getattr(cfg, f.name) for f in fields(lm.LMExperiment)}
    optim = cfg.optim
    if cfg.lr_from_preset > 0 and model in HF_PRESETS:
        optim = replace(optim, lr=cfg.lr_from_preset * HF_PRESETS[model].lr)
    safe = model.replace("/", "_").replace(":", "_")
    return lm.LMExperiment(**{**base, "hf_model": model, "optim": optim, "out": os.path.join(cfg.out, safe)})


def run(cfg: SweepExperiment) -> dict:
    if not cfg.models:
        raise ConfigError("models: name at least one model (e.g. pythia-14m,pythia-70m)")
    arms = parse_arms(cfg.arms, allow_local=True)
    if not parse_pairs(cfg.analysis.pairs, [a.name for a in arms], "analysis.pairs"):
        raise ConfigError("arms: the sweep measures gaps between arms; include vanilla in --arms (every arm is "
                          "compared with it) or name pairs with --analysis.pairs TREATMENT/BASELINE")
    results = Results("sweep", cfg, body={"seeds": cfg.seed_list(), "models": []})
    rows = results["models"]
    with recording(results, cfg.out):
        for model in cfg.models:
            sub = _lm_config(cfg, model)
            print(f"myopia sweep: {model} (lr {sub.optim.lr:g}) -> {sub.out}", flush=True)
            res = lm.run(sub)
            if res["status"] != Status.COMPLETED:
                print("myopia sweep: interrupted; rerun with --resume to continue", flush=True)
                break
            rows.append({"model": model, "parameters": res["parameters"], "lr": sub.optim.lr,
                         "arms": {k: v["loss"] for k, v in res["arms"].items()},
                         "comparisons": {label: {"treatment": c["treatment"], "baseline": c["baseline"],
                                                 "gap": c["gap"],
                                                 "position0_gap": c.get("first_position_gap", c["gap_per_position"][0])}
                                         for label, c in res["comparisons"].items()},
                         "paper_gap": PAPER_GAPS.get(model)})
        data = results.write(cfg.out, Status.COMPLETED if len(rows) == len(cfg.models) else Status.INTERRUPTED)
    _write_report(cfg.out, data)
    for r in rows:
        for label, c in r["comparisons"].items():
            print(f"  {r['model']:>14} ({r['parameters'] / 1e6:.1f}M): gap {label} {format_ci(c['gap'])}", flush=True)
    return data


def _write_report(out: str, results: dict) -> None:
    rows = results["models"]
    labels = list(dict.fromkeys(label for r in rows for label in r["comparisons"]))
    made = None
    plt = plots._pyplot() if rows else None
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
        fig.tight_layout()
        made = os.path.join(out, "gap_vs_params.png")
        fig.savefig(made, dpi=130)
        plt.close(fig)
    cfg = results["config"]
    text = ["# Myopia gap across model sizes (Wu et al. 2024, §4.2)", "",
            f"Corpus {cfg['data']['corpus']}, tokenizer {cfg['data']['tokenizer']}, {cfg['data']['seq_len']}-token windows, "
            f"{cfg['train']['steps']} steps of {cfg['train']['batch_size']} windows per arm{lm.start_text(cfg)}; "
            "every arm of a model shares "
            "every optimiser setting (the paper's myopic Pythia arm silently ran another learning rate). "
            f"Intervals: 95% CI {lm.ci_text(len(results['seeds']))}"
            + (" (`--seeds 0,1,2` for intervals over seeds)." if len(results["seeds"]) == 1 else ".")
            + " A preset name with fresh weights is the published shape; its parameter count includes the "
            "embedding sized to this tokenizer, and the paper's gaps are for the released, fully trained models "
            "(myopic − vanilla only).", "",
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


__all__ = ["PAPER_GAPS", "PRESETS", "SweepExperiment", "run"]
