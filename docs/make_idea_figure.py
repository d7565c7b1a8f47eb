"""Draw docs/idea.png: where the gradient of a later position's loss flows in vanilla and myopic training.

    python docs/make_idea_figure.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402


def panel(ax, title, myopic):
    T = 4
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylim(-0.9, 2.9)
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    for t in range(T):
        for layer, y in ((0, 0.0), (1, 1.2)):
            ax.add_patch(plt.Rectangle((t - 0.3, y - 0.22), 0.6, 0.44, fc="#e8eef7", ec="#4a6fa5"))
            ax.text(t, y, f"h$_{t}^{layer}$", ha="center", va="center", fontsize=9)
        ax.text(t, 2.35, f"L$_{t}$", ha="center", va="center", fontsize=10,
                bbox=dict(boxstyle="round", fc="#fbe3d6", ec="#c0603a"))
        ax.add_patch(FancyArrowPatch((t, 2.12), (t, 1.45), arrowstyle="-|>", mutation_scale=10, color="#c0603a"))
    # gradient of L_3 into earlier positions' states through attention
    for j in range(3):
        style = dict(arrowstyle="-|>", mutation_scale=10, lw=1.4,
                     color="#bbbbbb" if myopic else "#c0603a", ls="--" if myopic else "-")
        ax.add_patch(FancyArrowPatch((3 - 0.25, 1.0), (j + 0.2, 0.22), connectionstyle="arc3,rad=-0.15", **style))
    ax.add_patch(FancyArrowPatch((3, 0.98), (3, 0.22), arrowstyle="-|>", mutation_scale=10, lw=1.4, color="#c0603a"))
    note = ("past states are constants for L$_3$;\nW$_K$, W$_V$ still learn from every position"
            if myopic else "L$_3$ trains the features computed\nat positions 0-2 (off-diagonal terms)")
    ax.text((T - 1) / 2, -0.7, note, ha="center", va="center", fontsize=8.5)


fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.3))
panel(axes[0], "vanilla: ∇ of L$_3$ reaches h$_{0..2}$", myopic=False)
panel(axes[1], "myopic: ∇ of L$_3$ stops at h$_{0..2}$", myopic=True)
fig.tight_layout()
fig.savefig(os.path.join(os.path.dirname(__file__), "idea.png"), dpi=130)
