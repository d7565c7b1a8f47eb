"""Conditions × seeds × arms: the grid ``myopia synthetic`` and ``myopia answer`` train.

A *condition* is one setting of the experiment's task (a shift and p, a pad, a path-star mode). For
every seed, and every condition within it, the condition's arms train one after another from the
same initial weights on the same batches (:func:`~myopia.runs.runner.run_arms`) in
``<out>/seed<N>/<condition>/<arm>/``. After each arm the experiment scores the trained model, and its
score becomes ``results["conditions"][condition]["runs"][seed][arm]`` (with the path of the arm's
metrics). Summaries over seeds read those runs back with :func:`runs_by_arm` and :func:`paired_runs`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from myopia.models.gpt import GPTConfig
from myopia.runs.arms import Arm, build_model
from myopia.runs.pairs import Pair
from myopia.runs.results import Results, Status
from myopia.runs.runner import run_arms
from myopia.tasks.base import Task
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.layout import condition_dir, metrics_path
from myopia.train.loop import ArmResult

Score = Callable[[Arm, torch.nn.Module, ArmResult], dict]
"""Scores one trained arm: ``score(arm, model, result)`` gives its entry in the results."""


class Condition(Protocol):
    label: str
    """The condition's name: its results key and its folder."""
    arms: tuple[Arm, ...]
    """The arms trained under it."""

    def make_task(self, seed: int) -> Task:
        """The condition's task for one seed."""


@dataclass(frozen=True)
class Cell:
    """One condition of one seed: what its arms train on, and where."""

    condition: Condition
    seed: int
    task: Task
    train: TrainConfig
    """The training settings, with this seed."""
    folder: str
    """``<out>/seed<N>/<condition>``, the arm folders' parent."""


class GridExperiment(Protocol):
    """The settings the grid reads (every grid experiment's configuration has them)."""

    out: str
    seeds: list[int]
    resume: bool
    model: GPTConfig
    optim: OptimConfig
    train: TrainConfig


def train_grid(cfg: GridExperiment, results: Results, conditions: Sequence[Condition],
               scorer: Callable[[Cell], Score], monitor: Callable[[Cell], Callable | None] | None = None) -> bool:
    """Train every seed's conditions, seed by seed, into ``results["conditions"][label]["runs"]``.

    ``scorer(cell)`` is called once per :class:`Cell`, before its arms train (it may prepare the
    task), and returns the :data:`Score` of its arms; ``monitor(cell)`` may give the arms a training
    monitor (``run_arms``'s ``monitor_for``). Returns False if the run was interrupted (the arms'
    checkpoints are saved; ``--resume`` continues)."""
    for seed in cfg.seeds:
        for cond in conditions:
            if not _train_cell(cfg, results, cond, seed, scorer, monitor):
                return False
    return True


def _train_cell(cfg: GridExperiment, results: Results, cond: Condition, seed: int,
                scorer: Callable[[Cell], Score], monitor: Callable[[Cell], Callable | None] | None) -> bool:
    task = cond.make_task(seed)
    overrides = task.model_overrides()
    cell = Cell(cond, seed, task, replace(cfg.train, seed=seed), condition_dir(cfg.out, seed, cond.label))
    score = scorer(cell)
    seed_runs: dict = {}

    def after_arm(arm, model, result):
        metrics = os.path.relpath(metrics_path(os.path.join(cell.folder, arm.name)), cfg.out)
        seed_runs[arm.name] = {**score(arm, model, result), "metrics": metrics}

    status = run_arms(cell.folder, cfg, list(cond.arms), task, lambda arm: build_model(cfg.model, arm, overrides, seed),
                      cfg.optim, cell.train, resume=cfg.resume, on_arm_done=after_arm,
                      monitor_for=monitor(cell) if monitor is not None else None)
    results["conditions"][cond.label]["runs"][str(seed)] = seed_runs
    return status["status"] == Status.COMPLETED


def runs_by_arm(entry: dict) -> dict[str, list[dict]]:
    """One condition's runs by arm, ``{arm: [its run in each seed that trained it]}``, arms in the
    order they first appear."""
    arms = dict.fromkeys(arm for runs in entry["runs"].values() for arm in runs)
    return {arm: [r[arm] for r in entry["runs"].values() if arm in r] for arm in arms}


def paired_runs(entry: dict, pair: Pair) -> list[dict]:
    """One condition's seeds (their runs of every arm) that trained both arms of ``pair``."""
    return [r for r in entry["runs"].values() if pair.treatment in r and pair.baseline in r]


def arm_folders(out: str, seed: int, conditions: Iterable[Condition]) -> dict[str, str]:
    """``{"<condition> <arm>": its arm folder}`` for one seed (e.g. the gradient geometry's runs)."""
    return {f"{cond.label} {arm.name}": os.path.join(condition_dir(out, seed, cond.label), arm.name)
            for cond in conditions for arm in cond.arms}


__all__ = ["Cell", "Condition", "GridExperiment", "Score", "arm_folders", "paired_runs", "runs_by_arm", "train_grid"]
