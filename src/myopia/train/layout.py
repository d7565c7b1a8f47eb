"""Where a run's files live: the one module that names the folders and files of a run.

::

    <out>/                           a command's run folder (--out): results.json, report.md, plots
      seed<N>/[<condition>/]         the arms of one seed (and condition), as run_arms trains them
                                     (myopia train: its arms directly in <out>)
        config.yaml, results.json    the resolved configuration and the arms' training results
        <arm>/                       one arm
          checkpoints/step_NNNNNNN/  its checkpoints (:mod:`myopia.train.checkpoint`)
          metrics.jsonl              what the training loop logged
      pretrain/[seed<N>/]vanilla/    lm: the vanilla start every arm fine-tunes (an arm folder)

Everything that writes or reads these paths (the training loop and its trackers, the runner, the
experiments, ``myopia export`` and ``myopia eval``) asks this module for them; it imports nothing of
myopia, so the training loop, at the bottom of them, can too.
"""

from __future__ import annotations

import glob
import os
import re

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PRETRAIN = "pretrain"
SEED_PREFIX = "seed"


def seed_dir(out: str, seed: int) -> str:
    """``<out>/seed<N>``: one seed's arms (and, below it, conditions)."""
    return os.path.join(out, f"{SEED_PREFIX}{seed}")


def condition_dir(out: str, seed: int, condition: str) -> str:
    """``<out>/seed<N>/<condition>``: the arms one seed trained under one condition."""
    return os.path.join(seed_dir(out, seed), condition)


def config_path(run_dir: str) -> str:
    """The ``config.yaml`` that the runner writes beside the arm folders it trains."""
    return os.path.join(run_dir, CONFIG)


def checkpoints_dir(arm_dir: str) -> str:
    return os.path.join(arm_dir, CHECKPOINTS)


def metrics_path(arm_dir: str) -> str:
    return os.path.join(arm_dir, METRICS)


def pretrain_dir(out: str, seed: int | None = None) -> str:
    """The pretrained start's arm folder: ``<out>/pretrain/vanilla``, or per seed
    ``<out>/pretrain/seed<N>/vanilla``."""
    root = os.path.join(out, PRETRAIN)
    return os.path.join(seed_dir(root, seed), "vanilla") if seed is not None else os.path.join(root, "vanilla")


def is_arm_dir(path: str) -> bool:
    """Whether ``path`` is an arm folder (it holds ``checkpoints/``)."""
    return os.path.isdir(checkpoints_dir(path))


def seed_folders(run: str) -> list[str]:
    """The names of ``run``'s ``seed<N>`` folders, sorted by name."""
    return sorted(d for d in os.listdir(run) if d.startswith(SEED_PREFIX) and os.path.isdir(os.path.join(run, d)))


def arm_dirs(folder: str) -> list[str]:
    """The names of the arm folders in ``folder``, vanilla first, then by name."""
    return sorted((d for d in os.listdir(folder) if is_arm_dir(os.path.join(folder, d))),
                  key=lambda a: (a != "vanilla", a))


def arm_over_seeds(run: str, arm: str) -> list[str]:
    """``run/seed<N>/<arm>`` for every seed that trained ``arm``, by seed number."""
    found = glob.glob(checkpoints_dir(os.path.join(run, f"{SEED_PREFIX}*", arm)))
    found.sort(key=lambda p: int(re.sub(r"\D", "", os.path.basename(os.path.dirname(os.path.dirname(p)))) or 0))
    return [os.path.dirname(p) for p in found]


__all__ = ["CHECKPOINTS", "CONFIG", "METRICS", "arm_dirs", "arm_over_seeds", "checkpoints_dir", "condition_dir",
           "config_path", "is_arm_dir", "metrics_path", "pretrain_dir", "seed_dir", "seed_folders"]
