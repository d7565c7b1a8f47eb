"""The gradient split measured during an experiment's training runs: which arms get a monitor, the
trajectories gathered from the arms' ``metrics.jsonl``, a plot and the report's paragraph."""

from __future__ import annotations

from collections.abc import Callable

from myopia.analysis import plots
from myopia.analysis.gradients import PAPER_GEOMETRY, split_monitor, splittable
from myopia.train.config import TrainConfig
from myopia.train.distributed import sharded_across_ranks
from myopia.train.layout import metrics_path
from myopia.train.loop import MetricsLog


def monitor_factory(task, n_batches: int, train: TrainConfig, groups: int = 1) -> Callable | None:
    """``monitor_for(arm, model)`` for ``run_arms`` training with ``train`` (batch size, precision,
    eval cadence, last step), measuring in ``groups`` parameter groups (``gradient_split``), or None
    when off (``n_batches`` 0, or FSDP: the bare model's parameters are shards there)."""
    if n_batches <= 0 or sharded_across_ranks(train.parallel):
        return None

    def monitor_for(arm, model):
        # Only arms whose forward is the vanilla one: switching cuts to measure changes the backward only.
        if arm.local or arm.cut.changes_forward or not splittable(model):
            return None
        return split_monitor(task, n_batches, train.batch_size, train.precision, train.eval_every, train.steps,
                             groups)

    return monitor_for


def read_trajectory(arm_dir: str) -> list[dict]:
    """``[{"step": s, **split}, ...]`` from an arm's metrics (empty if it was not measured)."""
    return [{"step": r["step"], **r["gradient_split"]}
            for r in MetricsLog(metrics_path(arm_dir), enabled=False).read()  # read only
            if "gradient_split" in r]


def collect(run_dirs: dict[str, str]) -> dict | None:
    """``{"runs": {label: trajectory}, "paper": ...}`` for the labelled arm directories that were
    measured, or None if none was."""
    runs = {label: t for label, path in run_dirs.items() if (t := read_trajectory(path))}
    return {"runs": runs, "paper": PAPER_GEOMETRY} if runs else None


def plot(geometry: dict, path: str, offsets: dict[str, int] | None = None) -> str | None:
    """Norms (left) and cos(myopic, future) (right) against the step; ``offsets`` shift a run's steps
    (fine-tuning runs start where pretraining ended)."""
    plt = plots.pyplot()
    if plt is None:
        return None
    offsets = offsets or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(geometry["runs"].items()):
        x = [r["step"] + offsets.get(label, 0) + 1 for r in runs]
        colour = colours[i % len(colours)]
        for key, style in (("total_norm", "-"), ("myopic_norm", "--"), ("future_norm", ":")):
            left.plot(x, [r[key] for r in runs], style, color=colour, lw=1.3,
                      label=f"{label}: {key.split('_')[0]}")
        right.plot(x, [r["cos_myopic_future"] for r in runs], "o-", ms=3, color=colour, lw=1.3, label=label)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("step + 1")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("gradient norm (body parameters)")
    left.set_title("Vanilla gradient = myopic + future")
    left.legend(frameon=False, fontsize=7)
    right.axhline(0, color="black", lw=0.8)
    paper = geometry["paper"]
    right.plot([1, paper["cos_min_step"] + 1], [paper["cos_at_init"], paper["cos_min"]], "s", color="grey",
               label="paper's repo (Pythia-410m): init, minimum")
    right.set_ylabel("cos(myopic, future)")
    right.set_title("Do the future terms pull with or against the myopic ones?")
    right.legend(frameon=False, fontsize=7)
    return plots.save_figure(fig, path)


def report_lines(geometry: dict) -> list[str]:
    """The report's paragraph: each run's split at its first, most negative and last measurement."""
    paper = geometry["paper"]
    lines = ["## Gradient geometry: the vanilla gradient split into myopic and future parts", "",
             "On fixed held-out batches, at the weights of each measured step: g_total (vanilla) = g_myopic "
             "(each position's loss through its own states) + g_future (later positions' losses through "
             "earlier states: the only signal that trains pre-caching). Body parameters only (embeddings and "
             "head left out, as in the paper's repository). future share = ‖g_future‖² / ‖g_total‖². "
             f"Paper's repository ({paper['model']}): cos ≈ {paper['cos_at_init']:+.2f} at initialisation, "
             f"{paper['cos_min']:+.2f} near step {paper['cos_min_step']}, {paper['cos_late']:+.2f} after 10k steps.", "",
             "| run | step | ‖g_total‖ | ‖g_myopic‖ | ‖g_future‖ | future share | cos(myopic, future) |",
             "|---|---|---|---|---|---|---|"]
    for label, runs in geometry["runs"].items():
        lowest = min(runs, key=lambda r: r["cos_myopic_future"])
        for r in {r["step"]: r for r in (runs[0], lowest, runs[-1])}.values():  # each step once
            lines.append(f"| {label} | {r['step']} | {r['total_norm']:.3g} | {r['myopic_norm']:.3g} | "
                         f"{r['future_norm']:.3g} | {r['future_share']:.3g} | {r['cos_myopic_future']:+.3f} |")
    return lines + [""]


def layer_lines(record: dict, label: str) -> list[str]:
    """The report's per-layer table of one measurement (``record``: a trajectory entry with ``layers``)."""
    layers = record.get("layers") or {}
    if not layers:
        return []
    lines = [f"## Gradient geometry per layer: {label}, step {record['step']}", "",
             "| block | ‖g_total‖ | ‖g_myopic‖ | ‖g_future‖ | future share | cos(myopic, future) |",
             "|---|---|---|---|---|---|"]
    for layer, r in sorted(layers.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {layer} | {r['total_norm']:.3g} | {r['myopic_norm']:.3g} | {r['future_norm']:.3g} | "
                     f"{r['future_share']:.3g} | {r['cos_myopic_future']:+.3f} |")
    return lines + [""]


__all__ = ["collect", "layer_lines", "monitor_factory", "plot", "read_trajectory", "report_lines"]
