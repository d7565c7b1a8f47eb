"""The models myopia trains: :mod:`~.gpt` (myopia's GPT), :mod:`~.local` (the local-myopic wrapper),
:mod:`~.generate` (greedy decoding with a KV cache) and :mod:`~.hf` (Hugging Face models: myopic
attention, presets, LoRA)."""

from myopia.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
