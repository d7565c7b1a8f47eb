"""myopia: do transformer language models plan ahead? Myopic training, exact and fast.

Core (no optional extras needed): :class:`GPT`, :class:`GPTConfig`, :func:`attention`.
Hugging Face models: ``from myopia.hf import make_myopic`` (needs ``transformers``).
"""

from myopia.attention import ATTENTION_MODES, attention
from myopia.models.gpt import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = ["ATTENTION_MODES", "GPT", "GPTConfig", "__version__", "attention"]
