"""Arms of an experiment: the same model, data, optimiser, schedule and seed, trained in different
attention modes. An arm is named by its mode, optionally with a beta: ``myopic@0.5``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from myopia.attention.modes import check_mode
from myopia.config import ConfigError
from myopia.model import GPT, GPTConfig

LOCAL_ARM = "local-myopic"


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str
    beta: float = 0.0
    local: bool = False
    """The local-myopic arm: starts from the trained vanilla model and reads its frozen past states."""


def parse_arm(spec: str) -> Arm:
    if spec in (LOCAL_ARM, "local"):
        return Arm(name=LOCAL_ARM, mode="myopic", local=True)
    mode, _, beta = spec.partition("@")
    try:
        value = float(beta) if beta else 0.0
        check_mode(mode, value)
    except ValueError as exc:
        raise ConfigError(f"arm {spec!r}: {exc} (write arms as MODE or MODE@BETA, e.g. myopic@0.5, "
                          f"or {LOCAL_ARM})") from None
    return Arm(name=spec, mode=mode, beta=value)


def parse_arms(specs: list[str], allow_local: bool = False) -> list[Arm]:
    if not specs:
        raise ConfigError("arms: name at least one arm (vanilla, myopic, myopic_kv, bigram or MODE@BETA)")
    arms = [parse_arm(s) for s in specs]
    if len({a.name for a in arms}) != len(arms):
        raise ConfigError(f"arms: {specs} names an arm twice")
    names = [a.name for a in arms]
    if LOCAL_ARM in names and not allow_local:
        raise ConfigError(f"arms: {LOCAL_ARM} is an arm of `myopia lm` (it reads a trained vanilla language model)")
    if LOCAL_ARM in names and ("vanilla" not in names or names.index("vanilla") > names.index(LOCAL_ARM)):
        raise ConfigError(f"arms: {LOCAL_ARM} reads the trained vanilla model; list vanilla before it")
    return arms


def check_fits(model_cfg: GPTConfig, overrides: dict, source: str) -> None:
    """One-line errors when the data do not fit a model whose shape is fixed (e.g. loaded)."""
    if (model_cfg.input_dim is None) != (overrides.get("input_dim") is None):
        kind = "continuous vectors" if model_cfg.input_dim is not None else "token ids"
        raise ConfigError(f"init_from: the model in {source} reads {kind}, which data.source does not provide")
    vocab = overrides.get("vocab_size")
    if overrides.get("input_dim") is None and vocab is not None and vocab > model_cfg.vocab_size:
        raise ConfigError(f"data.text.tokenizer gives {vocab} token ids but the model in {source} has "
                          f"vocab_size {model_cfg.vocab_size}; use the tokenizer that model was trained with")
    T = overrides.get("block_size")
    if T is not None and T > model_cfg.block_size:
        raise ConfigError(f"the data's window of {T} tokens is longer than the context of the model in {source} "
                          f"(block_size {model_cfg.block_size}); use a window of at most {model_cfg.block_size}")


def load_model(path: str, arm: Arm, overrides: dict) -> GPT:
    """A GPT from a myopia checkpoint (a step_* folder, or an arm folder: its latest checkpoint),
    switched to the arm's attention mode."""
    import os

    from myopia.train.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        read_checkpoint,
    )

    folder = path if os.path.isfile(os.path.join(path, "state.json")) else latest_checkpoint(os.path.join(path, "checkpoints"))
    if folder is None or not os.path.isdir(folder):
        raise ConfigError(f"init_from: {path!r} is neither a checkpoint folder nor an arm folder holding checkpoints")
    weights, _, state, _ = read_checkpoint(folder)
    if "model_config" not in state:
        raise CheckpointError(f"init_from: checkpoint {folder} does not record its model configuration")
    cfg = GPTConfig.from_dict(state["model_config"])
    check_fits(cfg, overrides, folder)
    model = GPT(replace(cfg, attention=arm.mode, beta=arm.beta))
    model.load_state_dict(weights)
    return model


def build_model(base: GPTConfig, arm: Arm, overrides: dict, seed: int) -> GPT:
    """The arm's model: identical initial weights in every arm (same seed, same shapes)."""
    try:
        cfg = replace(base, **overrides, attention=arm.mode, beta=arm.beta)
        torch.manual_seed(seed)
        return GPT(cfg)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
