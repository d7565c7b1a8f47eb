"""``myopia sweep``: the language-modelling protocol over model sizes (paper §4.2, Pythia scaling).

Modules: :mod:`~.pipeline` (the configuration, presets and the run: one ``myopia lm`` run per model).
"""

from myopia.experiments.sweep.pipeline import PAPER_GAPS, PRESETS, SweepExperiment, run

__all__ = ["PAPER_GAPS", "PRESETS", "SweepExperiment", "run"]
