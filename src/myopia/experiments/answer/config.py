"""``myopia answer``'s configuration: the experiment's dataclass, its presets (per task), the paper's
numbers, and the conditions (pads, path-star modes) a configuration expands into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from myopia.config import ConfigError
from myopia.models.gpt import GPTConfig
from myopia.runs.arms import Arm, parse_arms
from myopia.tasks.answer import (
    PATH_STAR_MODES,
    AnswerTask,
    MultiplyConfig,
    MultiplyTask,
    ParityConfig,
    ParityTask,
    PathStarConfig,
    PathStarTask,
)
from myopia.train.config import OptimConfig, TrainConfig

TASKS = ("multiply", "path-star", "parity")

PAPER = {  # paper.md §5 (R14): 5×5-digit reversed multiplication, GPT-2 124M from scratch, greedy exact match
    "multiply": {"setting": "5×5 digits, GPT-2 124M from scratch, 10M samples, 1,024 test samples",
                 "exact_match": {"pad5": {"vanilla": 0.36, "myopic": 0.38}, "pad10": {"vanilla": 0.99, "myopic": 0.06}},
                 "filler_gain": {"vanilla": 0.63, "myopic": -0.32}},
    # Bachmann & Nagarajan (2024): teacher-forced training learns the later nodes (each is the child of
    # the one before: the "Clever Hans" cheat) but the first node after the source only at chance, 1/d.
    "path-star": {"setting": "Bachmann & Nagarajan 2024, teacher-forced next-token training",
                  "first_node": "≈ 1/degree (chance) in standard mode; reverse and teacherless can learn it"},
    "parity": {"setting": "paper's repository only (30 bits, GPT-2 from scratch, 1M samples); no results saved"},
}


@dataclass
class AnswerExperiment:
    """Tasks with answers: arms trained on the answer tokens, scored by greedy generation."""

    out: str = "runs/answer"
    """Run directory (results.json, report.md, plots, per-arm metrics and checkpoints)."""
    task: str = "multiply"
    """multiply (the paper's filler-token multiplication) | path-star | parity."""
    arms: list[str] = field(default_factory=lambda: ["vanilla", "myopic"])
    """Arms (gradient cuts): vanilla, myopic, myopic_kv, MODE@BETA, myopic:h=W, myopic:layers=A-B, ..."""
    pairs: list[str] = field(default_factory=list)
    """Comparisons TREATMENT/BASELINE by arm name (empty = every arm against vanilla)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds (initialisation and data); results carry a 95% t-interval over them."""
    pads: list[int] = field(default_factory=list)
    """multiply: pads to train one model per arm at (x_pad = y_pad = each); empty = multiply.x_pad / y_pad."""
    modes: list[str] = field(default_factory=list)
    """path-star: modes to run, one condition each (empty = path_star.mode)."""
    eval_samples: int = 1024
    """Held-out prompts answered by each trained model."""
    exclude_heldout: bool = False
    """Keep the held-out prompts (those scored and those of the held-out loss) out of training: a training
    draw equal to one is replaced by the next draw of the same (seed, step) stream. Off by default
    (the presets' published runs), where results count the held-out prompts training also drew."""
    resume: bool = False
    """Continue an interrupted run in --out."""
    multiply: MultiplyConfig = field(default_factory=MultiplyConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    path_star: PathStarConfig = field(default_factory=PathStarConfig)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {', '.join(TASKS)}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples={self.eval_samples} must be >= 1")


_TINY_TRAIN = {"steps": 30, "batch_size": 32, "eval_batches": 2, "log_every": 10, "progress": False}
_TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 40}
PRESETS: dict[str, dict] = {
    # The best 30-minute approximation found so far; NOT calibrated: the bar (vanilla filler gain >= 0.2,
    # interval above 0, myopic <= vanilla / 3) is not met. Measured 2026-11-30 on 2 cores: 18.2 min; filler
    # gain vanilla +0.03 [-0.19, 0.25], myopic -0.01 [-0.30, 0.28] (docs/answer-tasks.md, calibration table).
    "cpu": {
        "out": "runs/answer-multiply-cpu", "task": "multiply", "seeds": [0, 1, 2], "pads": [2, 4],
        "multiply": {"min_digits": 2, "max_digits": 2},
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 32},
        "optim": {"lr": 1e-3, "weight_decay": 0.01, "warmup": 0.02},
        # float32 on every CPU, as measured (auto: bf16 autocast on CPUs with bf16 units)
        "train": {"steps": 3000, "batch_size": 128, "eval_batches": 4, "log_every": 50, "precision": "fp32"},
        "eval_samples": 1024,
    },
    # The paper's setting (a GPU run): 5×5 digits, pad 5 vs 10, GPT-2 124M shape from scratch (12
    # layers, 12 heads, d=768, 1,024 positions, dropout 0.1 on embeddings and residual branches; our
    # 12-symbol vocabulary instead of GPT-2's 50,257 tokens, so ~86M parameters), batch 1024, 10M
    # samples (9,766 steps), AdamW lr 6e-4 wd 0.01, 1% warm-up + cosine, bf16; 1,024 test samples.
    # Not yet run: 4 models x 9,766 steps of 1,024 sequences of <= 31 tokens.
    "paper": {
        "out": "runs/answer-multiply-paper", "task": "multiply", "seeds": [0], "pads": [5, 10],
        # Trained on 1-5 digit operands, scored on 5x5 (the reference's training and validation sets).
        "multiply": {"min_digits": 1, "max_digits": 5, "eval_min_digits": 5},
        "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "dropout": 0.1},
        # No gradient clipping: the reference's Lightning Trainer leaves gradient_clip_val unset.
        "optim": {"lr": 6e-4, "weight_decay": 0.01, "warmup": 0.01, "grad_clip": 0.0},
        "train": {"steps": 9766, "batch_size": 1024, "precision": "bf16", "eval_batches": 4, "log_every": 50,
                  "checkpoint_every": 1000},
        "eval_samples": 1024,
    },
    "tiny": {  # seconds, for tests
        "out": "runs/answer-tiny", "task": "multiply", "pads": [2, 4],
        "multiply": {"min_digits": 1, "max_digits": 2},
        "model": _TINY_MODEL, "optim": {"lr": 3e-3},
        "train": _TINY_TRAIN, "eval_samples": 64,
    },
}
TASK_PRESETS: dict[str, dict[str, dict]] = {
    "parity": {
        # Measured 2026-11-30: 261 s on 2 cores (6 models x 3,000 steps); neither arm learns 12 bits here.
        "cpu": {"out": "runs/answer-parity-cpu", "seeds": [0, 1, 2], "parity": {"bits": 12},
                "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 16},
                "optim": {"lr": 1e-3, "warmup": 0.02},
                "train": {"steps": 3000, "batch_size": 128, "eval_batches": 4, "log_every": 50,
                          "precision": "fp32"},
                "eval_samples": 2048},
        "tiny": {"out": "runs/answer-parity-tiny", "parity": {"bits": 6}, "model": _TINY_MODEL,
                 "optim": {"lr": 3e-3}, "train": _TINY_TRAIN, "eval_samples": 64},
    },
    "path-star": {
        # Measured 2026-11-30: 9.7 min on 2 cores (3 modes x 2 arms x 3 seeds x 800 steps); not learned yet.
        "cpu": {"out": "runs/answer-path-star-cpu", "seeds": [0, 1, 2], "modes": list(PATH_STAR_MODES),
                "path_star": {"degree": 2, "length": 5, "nodes": 50},
                "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 40},
                "optim": {"lr": 1e-3, "warmup": 0.02},
                "train": {"steps": 800, "batch_size": 128, "eval_batches": 4, "log_every": 50,
                          "precision": "fp32"},
                "eval_samples": 1024},
        "tiny": {"out": "runs/answer-path-star-tiny", "modes": list(PATH_STAR_MODES),
                 "path_star": {"degree": 2, "length": 3, "nodes": 12}, "model": _TINY_MODEL,
                 "optim": {"lr": 3e-3}, "train": _TINY_TRAIN, "eval_samples": 64},
    },
}


def preset_for(name: str, given: dict) -> dict:
    """The preset ``name`` for the task the file and options ask for (multiply's table by default)."""
    task = given.get("task", "multiply")
    if task not in TASK_PRESETS:
        return PRESETS[name]
    table = TASK_PRESETS[task]
    if name not in table:
        raise ConfigError(f"preset: {name!r} has no {task} version; choose --preset {' or '.join(sorted(table))}")
    return {**table[name], "task": task}


@dataclass(frozen=True)
class Condition:
    """One setting of the task (a pad, a path-star mode, parity's one setting) and the arms trained on it."""

    label: str
    make_task: Callable[[int], AnswerTask]
    """seed -> the condition's task."""
    pad: int | None = None
    mode: str | None = None
    arms: tuple[Arm, ...] = ()


def conditions(cfg: AnswerExperiment) -> list[Condition]:
    """The grid's conditions: one per pad (multiply), per path-star mode, or parity's one setting,
    each with the arms; one-line errors for settings that do not fit the task or the model."""
    out = []
    if cfg.task == "multiply":
        for pad in cfg.pads or [None]:
            if pad is not None and pad < cfg.multiply.max_digits:
                raise ConfigError(f"pads: pad {pad} does not fit multiply.max_digits={cfg.multiply.max_digits} digits; "
                                  f"use pads of {cfg.multiply.max_digits} or more (or lower --multiply.max_digits)")
            mcfg = cfg.multiply if pad is None else replace(cfg.multiply, x_pad=int(pad), y_pad=int(pad))
            task = MultiplyTask(mcfg, 0)
            label = f"pad{task.x_pad}" if task.x_pad == task.y_pad else f"pad{task.x_pad}x{task.y_pad}"
            out.append(Condition(label, lambda seed, c=mcfg: MultiplyTask(c, seed), pad=task.x_pad))
    elif cfg.task == "path-star":
        for mode in cfg.modes or [cfg.path_star.mode]:
            try:
                pcfg = replace(cfg.path_star, mode=mode)
            except ValueError as exc:
                raise ConfigError(f"modes: {exc}") from None
            out.append(Condition(mode, lambda seed, c=pcfg: PathStarTask(c, seed), mode=mode))
    else:
        out.append(Condition(f"bits{cfg.parity.bits}", lambda seed: ParityTask(cfg.parity, seed)))
    if len({c.label for c in out}) != len(out):
        raise ConfigError(f"{'pads' if cfg.task == 'multiply' else 'modes'}: a value is given twice")
    for cond in out:
        task: AnswerTask = cond.make_task(0)
        if task.seq_len > cfg.model.block_size:
            raise ConfigError(f"model.block_size={cfg.model.block_size} is shorter than {cond.label}'s prompt + "
                              f"answer ({task.prompt_len} + {task.answer_len} tokens, {task.seq_len} model inputs); "
                              f"set --model.block_size {task.seq_len} or more")
    arms = tuple(parse_arms(cfg.arms))
    return [replace(cond, arms=arms) for cond in out]


__all__ = ["PAPER", "PRESETS", "TASKS", "TASK_PRESETS", "AnswerExperiment", "Condition", "conditions", "preset_for"]
