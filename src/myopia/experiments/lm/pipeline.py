"""``myopia lm``'s entry: one run at ``data.seq_len`` (:mod:`~myopia.experiments.lm.single`), or with
``context_lengths`` the context sweep (:mod:`~myopia.experiments.lm.context`), which runs the single
run once per window length."""

from __future__ import annotations

from myopia.experiments.lm.config import LMExperiment
from myopia.experiments.lm.context import run_context
from myopia.experiments.lm.single import run_single


def run(cfg: LMExperiment) -> dict:
    """The experiment: the context sweep when ``cfg.context_lengths`` names window lengths, else one run."""
    if cfg.context_lengths:
        return run_context(cfg)
    return run_single(cfg)


__all__ = ["run"]
