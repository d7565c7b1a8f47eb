"""``myopia train``: train arms of a GPT on the synthetic task or on local text."""

from __future__ import annotations

from dataclasses import dataclass, field

from myopia.models.gpt import GPTConfig
from myopia.runs.arms import build_model, load_model, parse_arms
from myopia.runs.runner import run_arms
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask
from myopia.tasks.text import TextConfig, TextTask
from myopia.train.config import OptimConfig, TrainConfig


@dataclass
class DataConfig:
    """Where training data comes from."""

    source: str = "synthetic"
    """synthetic (the paper's regression task, generated on the fly) | text (language modelling)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "text"):
            raise ValueError(f"source={self.source!r} is not one of synthetic, text")


@dataclass
class TrainExperiment:
    """Train one model in several attention modes (arms) under identical data, optimiser and seed."""

    out: str = "runs/train"
    """Run directory (config, per-arm metrics and checkpoints, results.json)."""
    arms: list[str] = field(default_factory=lambda: ["vanilla", "myopic"])
    """Arms to train: vanilla, myopic, myopic_kv, bigram, or MODE@BETA (e.g. myopic@0.5)."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoints."""
    init_from: str = ""
    """Start every arm from this trained model (a checkpoint folder or an arm folder) instead of --model."""
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=32))
    data: DataConfig = field(default_factory=DataConfig)


def make_task(data: DataConfig, seed: int, grad_accum: int = 1):
    if data.source == "synthetic":
        return SyntheticTask(data.synthetic, seed)
    return TextTask(data.text.for_grad_accum(grad_accum), seed)


def run(cfg: TrainExperiment) -> dict:
    arms = parse_arms(cfg.arms)
    task = make_task(cfg.data, cfg.train.seed, cfg.train.grad_accum)
    overrides = task.model_overrides()
    if cfg.init_from:
        load_model(cfg.init_from, arms[0], overrides)  # fail before any training if the data do not fit

        def make(arm):
            return load_model(cfg.init_from, arm, overrides)
    else:
        def make(arm):
            return build_model(cfg.model, arm, overrides, cfg.train.seed)
    return run_arms(cfg.out, cfg, arms, task, make, cfg.optim, cfg.train, resume=cfg.resume, experiment="train")
