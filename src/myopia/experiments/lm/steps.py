"""The gap against fine-tuning steps: every arm's in-training held-out loss (``train.eval_every``,
and step 0 with ``train.eval_on_start``), paired per seed and step, with an interval over seeds.

Within a seed every arm is scored on the same held-out batches (a function of the seed), so the
per-step difference is paired; with several seeds its interval is a 95% t-interval over them.
"""

from __future__ import annotations

import math
import os

from myopia.analysis import plots
from myopia.analysis.stats import format_ci, mean_ci
from myopia.runs.pairs import Pair
from myopia.train.layout import metrics_path, seed_dir
from myopia.train.loop import MetricsLog


def eval_losses(arm_dir: str) -> dict[int, float]:
    """``{step: held-out loss}`` from an arm's ``metrics.jsonl`` (the last record of a step wins)."""
    records = MetricsLog(metrics_path(arm_dir), enabled=False).read()
    return {int(r["step"]): float(r["eval_loss"]) for r in records if "eval_loss" in r}


def gap_by_step(out: str, seeds: list[int], pairs: list[Pair], tokens_per_step: int | None = None
                ) -> dict[str, list[dict]]:
    """``{pair label: [{"step", "tokens", "gap", "ci", "treatment_loss", "baseline_loss", "per_seed"}, ...]}``
    at every step where each seed scored both arms; ``tokens`` is the training tokens each arm had
    seen by then (``step × tokens_per_step``; absent without it); ``ci`` is ``[low, high]`` over seeds
    (``None`` with one seed). Pairs without such a step are left out."""
    losses = {seed: {} for seed in seeds}
    for seed in seeds:
        for pair in pairs:
            for arm in (pair.treatment, pair.baseline):
                if arm not in losses[seed]:
                    losses[seed][arm] = eval_losses(os.path.join(seed_dir(out, seed), arm))
    result = {}
    for pair in pairs:
        common = set.intersection(*(set(losses[s][pair.treatment]) & set(losses[s][pair.baseline]) for s in seeds))
        rows = []
        for step in sorted(common):
            t = [losses[s][pair.treatment][step] for s in seeds]
            b = [losses[s][pair.baseline][step] for s in seeds]
            gap = mean_ci([x - y for x, y in zip(t, b)])
            rows.append({"step": step, **({"tokens": step * tokens_per_step} if tokens_per_step else {}),
                         "gap": gap["mean"],
                         "ci": None if gap["low"] is None else [gap["low"], gap["high"]],
                         "treatment_loss": mean_ci(t)["mean"], "baseline_loss": mean_ci(b)["mean"],
                         "per_seed": [x - y for x, y in zip(t, b)]})
        if rows:
            result[pair.label] = rows
    return result


def first_step_check(out: str, seeds: list[int], pairs: list[Pair], same_forward: set[str]) -> dict[str, dict]:
    """The training forward pass checked where it must agree: the loss of the first step (the seed's
    first batch, at the start weights, before any update) in both arms of each pair whose arms both
    have the vanilla forward (``same_forward``; not bigram or local-myopic). Unlike the step-0
    held-out loss (scored without gradients, where every cut runs the same kernel), this is the
    forward that trains: the myopic arm's fused kernel against vanilla's. ``{label: {"per_seed":
    [treatment − baseline], "max_abs"}}``."""
    result = {}
    for pair in pairs:
        if not {pair.treatment, pair.baseline} <= same_forward:
            continue
        diffs = []
        for seed in seeds:
            losses = [_first_loss(os.path.join(seed_dir(out, seed), arm)) for arm in (pair.treatment, pair.baseline)]
            if None in losses:
                break
            diffs.append(losses[0] - losses[1])
        else:
            result[pair.label] = {"per_seed": diffs, "max_abs": max(abs(d) for d in diffs)}
    return result


def _first_loss(arm_dir: str) -> float | None:
    records = MetricsLog(metrics_path(arm_dir), enabled=False).read()
    return next((float(r["loss"]) for r in records if r.get("step") == 1 and "loss" in r), None)


def plot(by_step: dict[str, list[dict]], comparisons: dict, main: str, path: str) -> str | None:
    """The main pair's arms' held-out loss (left) and every pair's gap with its interval over seeds
    (right) against the fine-tuning step."""
    plt = plots.pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    rows, c = by_step[main], comparisons[main]
    unit = "tokens" if all("tokens" in r for rows_ in by_step.values() for r in rows_) else "step"
    xlabel = "fine-tuning tokens per arm" if unit == "tokens" else "fine-tuning step"
    x = [r[unit] for r in rows]
    left.plot(x, [r["baseline_loss"] for r in rows], "o-", ms=3, label=c["baseline"])
    left.plot(x, [r["treatment_loss"] for r in rows], "o-", ms=3, label=c["treatment"])
    plots.finish_axis(left, xlabel, "held-out cross-entropy (nats)", "Held-out loss (mean over seeds)")
    for i, (label, rows) in enumerate(by_step.items()):
        colour = f"C{i % 10}"
        right.plot([r[unit] for r in rows], [r["gap"] for r in rows], "o-", ms=3, color=colour,
                   label=f"{comparisons[label]['treatment']} − {comparisons[label]['baseline']}")
        with_ci = [r for r in rows if r["ci"] is not None]
        if with_ci:
            right.fill_between([r[unit] for r in with_ci], [r["ci"][0] for r in with_ci],
                               [r["ci"][1] for r in with_ci], color=colour, alpha=0.15)
    right.axhline(0.0, color="grey", ls="--", lw=1)
    plots.finish_axis(right, xlabel, "gap (nats; band: 95% CI over seeds)", "Gap against fine-tuning")
    positive = sorted(v for v in x if v > 0)
    if len(positive) >= 3 and positive[-1] >= 30 * positive[0]:  # log-spaced evaluations: a log axis (0 kept)
        # linear below the first evaluation, logarithmic above; the axis starts just left of 0 (autoscaling
        # would reach into negative decades) and its ticks are 0 and the powers of 10 past the linear part
        decades = range(math.ceil(math.log10(positive[0])), math.floor(math.log10(positive[-1])) + 1)
        for ax in (left, right):
            ax.set_xscale("symlog", linthresh=positive[0])
            ax.set_xlim(-0.3 * positive[0], positive[-1] * 1.3)
            ax.set_xticks([0] + [10 ** p for p in decades])
    return plots.save_figure(fig, path)


def report_lines(by_step: dict[str, list[dict]], comparisons: dict, main: str) -> list[str]:
    """The report's tables: the main pair's arms and gap per step, then every other pair's gap."""
    c = comparisons[main]
    t, b = c["treatment"], c["baseline"]
    lines = [f"## Gap against fine-tuning steps", "",
             "In-training held-out loss (`train.eval_batches` batches, the same in every arm of a seed; mean over "
             "seeds) and the paired gap (95% CI over seeds). At step 0 every arm is the start model, so the gap "
             "there is 0 by construction (scored without gradients, every cut runs the same kernel).", "",
             f"| step | tokens per arm | {b} | {t} | {t} − {b} [95% CI] | per seed |", "|---|---|---|---|---|---|"]
    for r in by_step[main]:
        tokens = f"{r['tokens']:,}" if "tokens" in r else "-"
        lines.append(f"| {r['step']} | {tokens} | {r['baseline_loss']:.4f} | {r['treatment_loss']:.4f} | {_gap(r)} | "
                     + ", ".join(f"{g:+.4f}" for g in r["per_seed"]) + " |")
    others = [label for label in by_step if label != main]
    if others:
        lines += ["", "| step | " + " | ".join(f"{comparisons[o]['treatment']} − {comparisons[o]['baseline']}"
                                              for o in others) + " |", "|---|" + "---|" * len(others)]
        at = {o: {r["step"]: r for r in by_step[o]} for o in others}
        for step in sorted({r["step"] for o in others for r in by_step[o]}):
            lines.append(f"| {step} | " + " | ".join(_gap(at[o][step]) if step in at[o] else "-" for o in others) + " |")
    return lines + [""]


def _gap(row: dict) -> str:
    ci = row["ci"] or [None, None]
    return format_ci({"mean": row["gap"], "low": ci[0], "high": ci[1]}, 4)


__all__ = ["eval_losses", "first_step_check", "gap_by_step", "plot", "report_lines"]
