"""``myopia answer``: tasks with answers (multiplication with filler, parity, path-star graphs).

Modules: :mod:`~.config` (the configuration, presets per task and the conditions it expands into),
:mod:`~.pipeline` (the run: conditions × seeds × arms, scored by greedy generation), :mod:`~.report`
(report.md and plots).
"""

from myopia.experiments.answer.config import PRESETS, TASK_PRESETS, AnswerExperiment, conditions, preset_for
from myopia.experiments.answer.pipeline import compare, filler_gain, run, summarise

__all__ = ["PRESETS", "TASK_PRESETS", "AnswerExperiment", "compare", "conditions", "filler_gain", "preset_for",
           "run", "summarise"]
