"""LoRA fine-tuning of Hugging Face models through PEFT: ``apply_lora(model, LoraConfig(r=8))``.

``make_myopic`` works on the PEFT-wrapped model in either order (before or after ``apply_lora``): the
LoRA layers' base projections are wrapped like plain projections, and the low-rank update runs on
the attention input the myopic record pass gives it, so the LoRA parameters get exactly the myopic
gradient (``tests/test_lora_trainer.py`` checks it against the definition in float64).
Needs the optional extra: ``pip install 'myopia[lora]'`` (peft).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from myopia.config import ConfigError

INSTALL = "pip install 'myopia[lora]' (peft==0.21.2)"


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on a Hugging Face model's linear layers; the base weights are frozen."""

    r: int = 0
    """Rank of the LoRA update (0 = no LoRA: every weight trains)."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: all-linear (attention q/k/v/o and the MLP, not the output head) or
    module names, e.g. q_proj,k_proj,v_proj,o_proj."""

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"r={self.r} must be >= 0 (0 = no LoRA)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is outside [0, 1)")


def apply_lora(model: nn.Module, cfg: LoraConfig, init: bool | str = True) -> nn.Module:
    """``model`` (a transformers causal LM) with LoRA adapters; only they require gradients.

    ``init=False`` starts the adapters' B matrices random instead of zero (tests)."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"lora.r={cfg.r} needs PEFT: {INSTALL}") from None
    targets = cfg.targets[0] if list(cfg.targets) == ["all-linear"] else list(cfg.targets)
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             task_type="CAUSAL_LM", init_lora_weights=init)
    return peft.get_peft_model(model, config)


def with_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """An experiment's arm model with LoRA when ``cfg.r`` > 0: the Hugging Face model inside an
    :class:`~myopia.models.hf.presets.HFCausalLM` gets the adapters; myopia's own GPT is refused."""
    if cfg.r == 0:
        return model
    inner = getattr(model, "hf", None)
    if inner is None:
        raise ConfigError(f"lora.r={cfg.r}: LoRA is for Hugging Face models (PEFT); add --hf_model "
                          "(e.g. a local checkpoint folder) or set --lora.r 0")
    model.hf = apply_lora(inner, cfg)
    return model


__all__ = ["LoraConfig", "apply_lora", "with_lora"]
