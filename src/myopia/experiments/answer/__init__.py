"""``myopia answer``: tasks with answers (multiplication with filler, parity, path-star graphs).

Modules: :mod:`~.pipeline` (the configuration, presets and the run: conditions × seeds × arms,
scored by greedy generation), :mod:`~.report` (report.md and plots).
"""

from myopia.experiments.answer.pipeline import (
    PRESETS,
    TASK_PRESETS,
    AnswerExperiment,
    compare,
    conditions,
    filler_gain,
    preset_for,
    run,
    summarise,
)

__all__ = ["PRESETS", "TASK_PRESETS", "AnswerExperiment", "compare", "conditions", "filler_gain", "preset_for",
           "run", "summarise"]
