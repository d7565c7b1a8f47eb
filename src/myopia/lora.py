"""``from myopia.lora import LoraConfig, apply_lora``: the import the README shows. The code is
:mod:`myopia.models.hf.lora`."""

from myopia.models.hf.lora import LoraConfig, apply_lora, with_lora

__all__ = ["LoraConfig", "apply_lora", "with_lora"]
