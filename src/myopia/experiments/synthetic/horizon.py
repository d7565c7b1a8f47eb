"""Synthetic horizon × shift: the synthetic task at several shifts s (y_n sums f(x_(n−s)) … f(x_(n−s−9)))
against arms that cut the gradient beyond a horizon w (``myopic:h=w``; plain ``myopic`` is w = 0),
with vanilla beside them. Per (shift, horizon): loss as a multiple of the trivial loss and the layer-1
probe R² for f(x_n), mean and 95% interval over seeds (``results["horizon_grid"]``), and the heat
map ``horizon_heatmap.png`` (two panels)."""

from __future__ import annotations

from myopia.analysis.stats import format_ci
from myopia.attention.cut import MYOPIC_MODES, Cut


def horizon_arms(cuts: dict[str, Cut]) -> list[tuple[str, int | None]]:
    """(arm, w) for the horizon arms (one mode, beta and layers: the first horizon arm's), sorted by w,
    then vanilla as w = None; empty when no arm has a horizon."""
    horizon = [(n, c) for n, c in cuts.items() if c.mode in MYOPIC_MODES and c.horizon is not None]
    if not horizon:
        return []
    ref = horizon[0][1]
    by_w: dict[int, str] = {}
    for n, c in cuts.items():
        if c.mode == ref.mode and c.beta == ref.beta and c.layers == ref.layers:
            if c.effective_horizon not in by_w or c.horizon is not None:  # an explicit h=0 over plain myopic
                by_w[c.effective_horizon] = n
    rows = sorted(((n, w) for w, n in by_w.items()), key=lambda r: r[1])
    return rows + [(n, None) for n, c in cuts.items() if c.is_vanilla]


def horizon_grid(results: dict, cuts: dict[str, Cut]) -> dict | None:
    """The grid over the task's (non-control) conditions, one per shift, from ``results["summary"]``."""
    arms = horizon_arms(cuts)
    conds = [(label, e) for label, e in results["conditions"].items() if not e["control"]]
    if not arms or not conds:
        return None
    summary = results["summary"]
    empty = {"mean": float("nan"), "low": None, "high": None, "n": 0}
    grid = {"conditions": [label for label, _ in conds], "shifts": [e["task"]["shift"] for _, e in conds],
            "arms": [n for n, _ in arms], "horizons": [w for _, w in arms], "ratio_to_trivial": [],
            "r2_layer1_fx": []}
    for key in ("ratio_to_trivial", "r2_layer1_fx"):
        grid[key] = [[summary.get(label, {}).get(n, {}).get(key, empty) for n, _ in arms] for label, _ in conds]
    return grid


def report_lines(grid: dict) -> list[str]:
    cols = [("vanilla" if w is None else f"w={w}") for w in grid["horizons"]]
    text = ["## Horizon × shift", "",
            "Arms cut the gradient beyond w positions per layer (w = 0: myopic; vanilla: no cut); the task's "
            "shift s puts f(x_m) to use at positions m+s … m+s+window−1. Loss as a multiple of the trivial loss, "
            "and layer-1 probe R² for f(x_n) (mean [95% CI over seeds]).", ""]
    for key, title in (("ratio_to_trivial", "loss × trivial"), ("r2_layer1_fx", "layer-1 R² f(x_n)")):
        text += [f"| {title}: shift | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for s, row in zip(grid["shifts"], grid[key]):
            text.append(f"| {s} | " + " | ".join(format_ci(c) if c["n"] else "-" for c in row) + " |")
        text.append("")
    return text


def plot(grid: dict, path: str) -> str | None:
    """Two heat maps (shift × horizon): loss × trivial and layer-1 R² for f(x_n)."""
    from myopia.analysis import plots

    plt = plots.pyplot()
    if plt is None:
        return None
    import numpy as np

    cols = [("van." if w is None else str(w)) for w in grid["horizons"]]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.7 * len(cols) * 2, 1.2 + 0.6 * len(grid["shifts"])), squeeze=False)
    for ax, key, title, vmax, cmap in zip(axes[0], ("ratio_to_trivial", "r2_layer1_fx"),
                                          ("loss × trivial", "layer-1 R² for f(x_n)"), (1.2, 1.0),
                                          ("viridis_r", "viridis")):
        data = np.array([[c["mean"] for c in row] for row in grid[key]], dtype=float)
        im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, vmin=0.0, vmax=vmax)
        for r in range(data.shape[0]):
            for c in range(data.shape[1]):
                ax.text(c, r, f"{data[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        bbox=dict(boxstyle="round,pad=0.1", fc="w", ec="none", alpha=0.7))
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols)
        ax.set_yticks(range(len(grid["shifts"])))
        ax.set_yticklabels([str(s) for s in grid["shifts"]])
        ax.set_xlabel("horizon w")
        ax.set_ylabel("shift s")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    seeds = max((c.get("n") or 0) for row in grid["ratio_to_trivial"] for c in row)
    fig.suptitle("Synthetic task: horizon × shift " + ("(one seed)" if seeds <= 1 else f"(mean over {seeds} seeds)"),
                 fontsize=10)
    return plots.save_figure(fig, path)


__all__ = ["horizon_arms", "horizon_grid", "plot", "report_lines"]
