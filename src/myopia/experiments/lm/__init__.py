"""``myopia lm``: the natural-language myopia gap (paper §4.1) with honest statistics.

Trains the arms (vanilla, myopic, bigram, ...) on identical data, optimiser, schedule and seed, then
scores every arm on the same held-out windows and reports: cross-entropy per arm with a 95% CI by
bootstrap over held-out *documents*; for every compared pair of arms (default: each against vanilla)
the gap with a paired bootstrap CI, by position and at position 0, the tokens where the two disagree
most (KL) and future-token linear probes.

Modules: :mod:`~myopia.experiments.lm.config` (configuration and presets), :mod:`~.pipeline` (the
entry: one run, or the context sweep), :mod:`~.single` (one run at one window length),
:mod:`~.context` (the sweep over window lengths, one single run each), :mod:`~.analysis` (held-out
scoring, pairs, seed statistics), :mod:`~.cuts` (horizon curves, per-layer sums), :mod:`~.steps` (the
gap against fine-tuning steps), :mod:`~.report` (summary, report.md, plots).
"""

from myopia.experiments.lm.analysis import analyse, combine_seeds, first_position_losses
from myopia.experiments.lm.config import PAPER, PRESETS, AnalysisConfig, LMExperiment, PretrainConfig
from myopia.experiments.lm.pipeline import run
from myopia.experiments.lm.report import ci_text, paper_number, start_text
from myopia.experiments.lm.single import starting_model

__all__ = ["PAPER", "PRESETS", "AnalysisConfig", "LMExperiment", "PretrainConfig", "analyse", "ci_text",
           "combine_seeds", "first_position_losses", "paper_number", "run", "start_text", "starting_model"]
