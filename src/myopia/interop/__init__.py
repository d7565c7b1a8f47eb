"""Ways out of myopia into other tools: :mod:`~.export` (a trained arm as a transformers checkpoint,
``myopia export``) and :mod:`~.evaluate` (lm-evaluation-harness on every arm, ``myopia eval``)."""
