"""The experiment kit every command shares: :mod:`~.arms` (arms parsed once into ``Arm`` objects, and
their models), :mod:`~.pairs` (the compared pairs), :mod:`~.runner` (arms trained one after another),
:mod:`~.grid` (conditions × seeds × arms), :mod:`~.results` (the results envelope) and
:mod:`~.gradient_geometry` (the gradient split measured while training). Where a run's files live:
:mod:`myopia.train.layout`."""
