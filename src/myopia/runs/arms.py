"""Arms of an experiment: the same model, data, optimiser, schedule and seed, trained under different
gradient cuts. An arm is written as its cut (:mod:`myopia.attention.cut`: ``myopic``, ``myopic@0.5``,
``myopic:h=8``, ``myopic:layers=0-1:name=early``) and named by its display name or that text."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from myopia.attention.cut import GRAMMAR, Cut, CutError
from myopia.config import ConfigError
from myopia.models.gpt import GPT, GPTConfig

LOCAL_ARM = "local-myopic"


@dataclass(frozen=True)
class Arm:
    name: str
    cut: Cut
    local: bool = False
    """The local-myopic arm: starts from the trained vanilla model and reads its frozen past states."""


def parse_arm(spec: str) -> Arm:
    if spec in (LOCAL_ARM, "local"):
        return Arm(name=LOCAL_ARM, cut=Cut("myopic"), local=True)
    try:
        cut = Cut.parse(spec)
    except CutError as exc:
        raise ConfigError(f"arm {spec!r}: {str(exc).split(': ', 1)[-1] if str(exc).startswith('cut') else exc} "
                          f"(or {LOCAL_ARM})") from None
    name = cut.name or spec
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"arm {spec!r}: its name {name!r} cannot be a folder name; give it :name=NAME")
    return Arm(name=name, cut=cut)


def parse_arms(specs: list[str], allow_local: bool = False) -> list[Arm]:
    if not specs:
        raise ConfigError(f"arms: name at least one arm ({GRAMMAR})")
    arms = [parse_arm(s) for s in specs]
    if len({a.name for a in arms}) != len(arms):
        raise ConfigError(f"arms: {specs} names an arm twice")
    names = [a.name for a in arms]
    if LOCAL_ARM in names and not allow_local:
        raise ConfigError(f"arms: {LOCAL_ARM} is an arm of `myopia lm` (it reads a trained vanilla language model)")
    if LOCAL_ARM in names and ("vanilla" not in names or names.index("vanilla") > names.index(LOCAL_ARM)):
        raise ConfigError(f"arms: {LOCAL_ARM} reads the trained vanilla model; list vanilla before it")
    return arms


def cut_layers(model: torch.nn.Module) -> tuple[int, str] | None:
    """``(number of blocks a cut can name, the model's name)`` for myopia's GPT or an HF model."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        return len(blocks), f"GPT with n_layer={len(blocks)}"
    hf = getattr(model, "hf", None)
    if hf is not None:
        from myopia.models.hf.myopic import attention_modules

        return len(attention_modules(hf)), f"{type(hf).__name__} with {len(attention_modules(hf))} attention layers"
    return None


def check_arms_fit(arms: list[Arm], model: torch.nn.Module) -> None:
    """One-line error, before anything trains, if an arm's cut names a block ``model`` lacks."""
    found = cut_layers(model)
    if found is None:
        return
    for arm in arms:
        try:
            arm.cut.check_layers(*found)
        except CutError as exc:
            raise ConfigError(f"arm {arm.name!r}: {str(exc).split(': ', 1)[-1]}") from None


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

    from myopia.train.layout import checkpoints_dir
    from myopia.train.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        read_checkpoint,
    )

    folder = path if os.path.isfile(os.path.join(path, "state.json")) else latest_checkpoint(checkpoints_dir(path))
    if folder is None or not os.path.isdir(folder):
        raise ConfigError(f"init_from: {path!r} is neither a checkpoint folder nor an arm folder holding checkpoints")
    weights, _, state, _ = read_checkpoint(folder)
    if "model_config" not in state:
        raise CheckpointError(f"init_from: checkpoint {folder} does not record its model configuration")
    cfg = GPTConfig.from_dict(state["model_config"])
    check_fits(cfg, overrides, folder)
    try:
        model = GPT(cfg).set_attention(arm.cut)
    except CutError as exc:
        raise ConfigError(f"arm {arm.name!r}: {str(exc).split(': ', 1)[-1]}") from None
    model.load_state_dict(weights)
    return model


def build_model(base: GPTConfig, arm: Arm, overrides: dict, seed: int) -> GPT:
    """The arm's model: identical initial weights in every arm (same seed, same shapes), switched to
    the arm's cut."""
    try:
        cfg = replace(base, **overrides)
        torch.manual_seed(seed)
        return GPT(cfg).set_attention(arm.cut)
    except CutError as exc:
        raise ConfigError(f"arm {arm.name!r}: {str(exc).split(': ', 1)[-1]}") from None
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
