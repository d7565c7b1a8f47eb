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
from dataclasses import dataclass, field, fields, replace

from myopia.analysis import plots
from myopia.analysis.stats import format_ci
from myopia.config import ConfigError
from myopia.experiments import lm
from myopia.models.hf.presets import preset_for, preset_lr
from myopia.runs.arms import parse_arms
from myopia.runs.pairs import PAPER_PAIR, parse_pairs
from myopia.runs.results import Results, Status, recording, write_report
from myopia.tasks.text import TextTask

# Held-out myopia gap per Pythia size in the paper (one 32-sequence batch; §4.2 of our notes).
PAPER_GAPS = {"pythia-14m": 0.157, "pythia-31m": 0.113, "pythia-70m": 0.057, "pythia-160m": 0.118,
              "pythia-410m": 0.119, "pythia-1b": 0.162, "pythia-1.4b": 0.170, "pythia-2.8b": 0.249}


@dataclass
class SweepExperiment(lm.LMExperiment):
    """The myopia gap across model sizes: one `myopia lm` run per model, gathered in one table and plot."""

    models: list[str] = field(default_factory=lambda: ["pythia-14m", "pythia-31m", "pythia-70m"])
    """Models, smallest first: Hugging Face presets, local checkpoint directories or hf:NAME."""
    lr_from_preset: float = 0.0
    """If > 0, each preset model, and each released Pythia model named hf:EleutherAI/pythia-SIZE, trains
    at this multiple of its authors' learning rate (the paper fine-tuned Pythia at 0.4×); 0 = optim.lr
    for every model (also for local folders and other hub models). Both arms always share it."""
    epochs: int = 0
    """If > 0 (with data.windows document_starts), train.steps is set to this many epochs over the
    training windows: epochs × windows // (train.batch_size × train.grad_accum), the same for every
    model; each window is read once per epoch, and the last partial batch (fewer windows than one step)
    is dropped. 0 = train.steps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0 (0 = train.steps)")


_PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b")

# The Pythia shapes (Biderman et al. 2023) trained from fresh weights on the built-in corpus, at 0.4x the
# authors' learning rates (a GPU run). Not the paper's experiment, which fine-tuned the released
# pretrained models: that is pythia-finetune. `pythia-scaling` is this preset's old name.
_PYTHIA_SHAPES_SCRATCH = {
    "out": "runs/sweep-pythia",
    "models": [f"pythia-{size}" for size in _PYTHIA_SIZES],
    "arms": ["vanilla", "myopic"], "lr_from_preset": 0.4,
    "data": {"corpus": "builtin", "tokenizer": "gpt-neox", "seq_len": 64},
    "optim": {"weight_decay": 0.01, "warmup": 0.05},
    "train": {"steps": 2000, "batch_size": 256, "eval_every": 500, "eval_batches": 16, "checkpoint_every": 500},
}

PRESETS: dict[str, dict] = {
    # The paper's §4.2 experiment (docs/pythia.md; needs the Hugging Face hub and a GPU): the released
    # pretrained Pythia models, 14m ... 2.8b, each fine-tuned vanilla and myopic for one epoch over the
    # first 64 tokens of every training document with >= 64 tokens (seq_len 63: 63 inputs and their 63
    # next tokens, as the paper's 64-token sequences), in an order shuffled by the seed, no BOS/EOS;
    # AdamW, weight decay 0.01, lr 0.4x each model's Pythia rate, 5% warm-up then cosine, 512 sequences
    # per step (128 x 4 accumulated), identical in both arms (the paper's myopic arm most likely ran at
    # 6e-4 and 1% warm-up instead). Data: MiniPile (1M Pile documents) instead of the paper's 10M
    # Pile documents; 2% held out, each held-out document's first 64 tokens; 16,000 of them (>= 1M
    # predicted tokens) are scored instead of the paper's one batch of 32.
    "pythia-finetune": {
        "out": "runs/sweep-pythia-finetune",
        "models": [f"hf:EleutherAI/pythia-{size}" for size in _PYTHIA_SIZES],
        "arms": ["vanilla", "myopic"], "lr_from_preset": 0.4, "epochs": 1,
        "data": {"corpus": "hf:JeanKaddour/minipile", "tokenizer": "gpt-neox", "seq_len": 63,
                 "windows": "document_starts", "heldout_fraction": 0.02},
        "optim": {"weight_decay": 0.01, "warmup": 0.05},
        "train": {"batch_size": 128, "grad_accum": 4, "eval_every": 200, "eval_on_start": True, "eval_batches": 16,
                  "checkpoint_every": 200, "log_every": 10},
        "analysis": {"heldout_windows": 16000},
    },
    "pythia-shapes-scratch": _PYTHIA_SHAPES_SCRATCH,
    "pythia-scaling": _PYTHIA_SHAPES_SCRATCH,  # the old name of pythia-shapes-scratch (fresh weights)
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
                print("myopia sweep: interrupted; rerun with --resume to continue", flush=True)
                break
            rows.append({"model": model, "parameters": res["parameters"], "lr": sub.optim.lr,
                         "arms": {k: v["loss"] for k, v in res["arms"].items()},
                         "comparisons": {label: {"treatment": c["treatment"], "baseline": c["baseline"],
                                                 "gap": c["gap"],
                                                 "position0_gap": c.get("first_position_gap", c["gap_per_position"][0])}
                                         for label, c in res["comparisons"].items()},
                         "paper_gap": _paper_gap(model)})
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


__all__ = ["PAPER_GAPS", "PRESETS", "SweepExperiment", "run"]
