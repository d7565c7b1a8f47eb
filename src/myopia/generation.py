"""``from myopia.generation import generate_greedy``: the import the README shows. The code is
:mod:`myopia.models.generate`."""

from myopia.models.generate import GenerationError, forward_cached, generate_greedy

__all__ = ["GenerationError", "forward_cached", "generate_greedy"]
