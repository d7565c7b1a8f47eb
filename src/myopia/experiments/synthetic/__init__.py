"""``myopia synthetic``: the paper's synthetic pre-caching experiment (§4), end to end.

Modules: :mod:`~.config` (the configuration and presets), :mod:`~.pipeline` (the run: conditions × seeds × arms,
probes), :mod:`~.horizon` (horizon × shift), :mod:`~.report` (report.md, plots, the did-not-learn
verdict).
"""

from myopia.experiments.synthetic.config import PRESETS, ProbeConfig, SyntheticExperiment
from myopia.experiments.synthetic.pipeline import compare, probe_model, run, summarise
from myopia.experiments.synthetic.report import did_not_learn

__all__ = ["PRESETS", "ProbeConfig", "SyntheticExperiment", "compare", "did_not_learn", "probe_model", "run",
           "summarise"]
