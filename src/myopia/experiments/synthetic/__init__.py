"""``myopia synthetic``: the paper's synthetic pre-caching experiment (§4), end to end.

Modules: :mod:`~.config` (the configuration, presets and the conditions it expands into),
:mod:`~.pipeline` (the run: conditions × seeds × arms trained and probed), :mod:`~.horizon`
(horizon × shift), :mod:`~.report` (report.md, plots, the did-not-learn verdict).
"""

from myopia.experiments.synthetic.config import PRESETS, ProbeConfig, SyntheticExperiment, conditions
from myopia.experiments.synthetic.pipeline import compare, probe_model, run, summarise
from myopia.experiments.synthetic.report import did_not_learn

__all__ = ["PRESETS", "ProbeConfig", "SyntheticExperiment", "compare", "conditions", "did_not_learn", "probe_model",
           "run", "summarise"]
