"""``myopia answer``: tasks with answers (multiplication with filler, parity, path-star graphs).

Modules: :mod:`~.config` (the configuration and presets), :mod:`~.pipeline` (the run: conditions × seeds × arms,
scored by greedy generation), :mod:`~.report` (report.md and plots).
"""

from myopia.experiments.answer.config import PRESETS, TASK_PRESETS, AnswerExperiment, preset_for
from myopia.experiments.answer.pipeline import compare, conditions, filler_gain, run, summarise

__all__ = ["PRESETS", "TASK_PRESETS", "AnswerExperiment", "compare", "conditions", "filler_gain", "preset_for",
           "run", "summarise"]
