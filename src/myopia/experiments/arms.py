"""Arms of an experiment: the same model, data, optimiser, schedule and seed, trained in different
attention modes. An arm is named by its mode, optionally with a beta: ``myopic@0.5``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from myopia.attention.modes import check_mode
from myopia.config import ConfigError
from myopia.model import GPT, GPTConfig


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str
    beta: float = 0.0


def parse_arm(spec: str) -> Arm:
    mode, _, beta = spec.partition("@")
    try:
        value = float(beta) if beta else 0.0
        check_mode(mode, value)
    except ValueError as exc:
        raise ConfigError(f"arm {spec!r}: {exc} (write arms as MODE or MODE@BETA, e.g. myopic@0.5)") from None
    return Arm(name=spec, mode=mode, beta=value)


def parse_arms(specs: list[str]) -> list[Arm]:
    if not specs:
        raise ConfigError("arms: name at least one arm (vanilla, myopic, myopic_kv, bigram or MODE@BETA)")
    arms = [parse_arm(s) for s in specs]
    if len({a.name for a in arms}) != len(arms):
        raise ConfigError(f"arms: {specs} names an arm twice")
    return arms


def build_model(base: GPTConfig, arm: Arm, overrides: dict, seed: int) -> GPT:
    """The arm's model: identical initial weights in every arm (same seed, same shapes)."""
    try:
        cfg = replace(base, **overrides, attention=arm.mode, beta=arm.beta)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    torch.manual_seed(seed)
    return GPT(cfg)
