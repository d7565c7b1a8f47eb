"""Hugging Face causal LMs: :mod:`~.myopic` (``make_myopic``: myopic attention for any family; needs
transformers), :mod:`~.presets` (presets, loading, the adapter experiments train) and :mod:`~.lora`
(PEFT adapters). Nothing is imported here, so that the presets and LoRA load without transformers."""
