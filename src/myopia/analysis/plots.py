"""PNG plots (matplotlib is an optional extra: without it, plotting is skipped with a message).

Every plot starts with ``plt = plots.pyplot()`` (``None`` without matplotlib: skip the plot), draws,
styles each axis with :func:`finish_axis` and ends with :func:`save_figure`.
"""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (with a one-line message) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install 'myopia[plot]')")
        return None
    return plt


def finish_axis(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, title, a frameless legend and a light grid: every myopia plot's axis style."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)


def save_figure(fig, path: str) -> str:
    """Lay out, write (130 dpi) and close ``fig``; return ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def loss_curves(series: dict[str, list[tuple[list[int], list[float]]]], path: str, title: str,
                ylabel: str, reference: float | None = None, log: bool = True, xlabel: str = "step",
                reference_label: str = "trivial (predict 0)") -> str | None:
    """One axis, one colour per series label; several runs (seeds) of a label share its colour."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(series.items()):
        for j, (steps, values) in enumerate(runs):
            ax.plot(steps, values, color=colours[i % len(colours)], alpha=0.9 if j == 0 else 0.5,
                    lw=1.4, label=label if j == 0 else None)
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1, label=reference_label)
    if log:
        ax.set_yscale("log")
    finish_axis(ax, xlabel, ylabel, title)
    return save_figure(fig, path)


def probe_heatmaps(panels: list[tuple[str, list[list[float]]]], lookbacks: list[int], path: str,
                   title: str, ncols: int = 3) -> str | None:
    """Heat maps of R² (layer × lookback), one panel each, on a shared colour scale."""
    plt = pyplot()
    if plt is None:
        return None
    import numpy as np

    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.2 * nrows + 0.6), squeeze=False)
    im = None
    for ax, (name, grid) in zip(axes.flat, panels):
        data = np.asarray(grid)
        vmin = -0.5 if "gain" in name else 0.0
        im = ax.imshow(data, aspect="auto", cmap="RdBu_r" if "gain" in name else "viridis",
                       vmin=vmin, vmax=1.0 if "gain" not in name else 0.5, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("lookback k (target f(x_{n-k}))", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_yticks(range(data.shape[0]))
        step = max(1, len(lookbacks) // 6)
        ax.set_xticks(range(0, len(lookbacks), step))
        ax.set_xticklabels(lookbacks[::step])
        for r, v in enumerate(data[:, 0]):  # the k = 0 column: f(x_n) at position n
            ax.text(0, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="k",
                    bbox=dict(boxstyle="round,pad=0.1", fc="w", ec="none", alpha=0.7))
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


__all__ = ["finish_axis", "loss_curves", "probe_heatmaps", "pyplot", "save_figure"]
