"""``myopia sweep``: the language-modelling protocol over model sizes (paper §4.2, Pythia scaling).

Modules: :mod:`~.config` (the configuration, presets and the paper's gaps), :mod:`~.pipeline` (the
run: one ``myopia lm`` run per model), :mod:`~.report` (report.md and the gap-vs-parameters plot).
"""

from myopia.experiments.sweep.config import PAPER_GAPS, PRESETS, SweepExperiment
from myopia.experiments.sweep.pipeline import run

__all__ = ["PAPER_GAPS", "PRESETS", "SweepExperiment", "run"]
