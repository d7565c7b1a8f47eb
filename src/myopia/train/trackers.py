"""Experiment trackers (``--train.log_to tensorboard,wandb``): every record the training loop writes to
``metrics.jsonl`` is streamed to them too, with the run's configuration as hyper-parameters, one
tracker run per arm, grouped by experiment (the run folder).

- TensorBoard: event files in ``<arm folder>/tensorboard`` (``tensorboard --logdir RUN``); scalars
  under the record's keys (nested ones as ``gradient_split/future_share``), the configuration as
  hparams and as text.
- Weights & Biases: project ``$WANDB_PROJECT`` (default ``myopia``), group = the run folder, name =
  the arm; ``WANDB_MODE=offline`` keeps it local.

Both are optional extras; a missing one is a one-line error naming the pip command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from myopia.config import ConfigError
from myopia.train import layout

TRACKERS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install 'myopia[tensorboard]' (tensorboard==2.21.0)",
           "wandb": "pip install 'myopia[wandb]' (wandb==0.31.0)"}


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of a metrics record (nested dicts flattened with '/'), without ``step``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as ``{"section.key": value}`` with lists and None as strings (hparam types)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class TensorBoardSink:
    def __init__(self, log_dir: str, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise ConfigError(f"train.log_to: tensorboard needs the tensorboard package: {INSTALL['tensorboard']}") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        flat = flat_config(config)
        for summary in hparams(flat, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    def __init__(self, group: str, name: str, directory: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"train.log_to: wandb needs the wandb package: {INSTALL['wandb']}") from None
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "myopia"), group=group, name=name,
                              job_type="arm", config=config, dir=directory, reinit="create_new")

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """Several sinks behind one ``log(record)`` / ``close()``."""

    def __init__(self, sinks: Iterable):
        self.sinks = list(sinks)

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_sinks(log_to: list[str], arm_dir: str, arm: str, config: dict) -> Sinks | None:
    """The trackers ``log_to`` names for one arm (None when it names none). The experiment (group) is
    the run folder; a seed folder (``seed0``) becomes part of the arm's name."""
    if not log_to:
        return None
    run_dir = os.path.dirname(os.path.abspath(arm_dir))
    group, name = os.path.basename(run_dir), arm
    if group.startswith(layout.SEED_PREFIX) or group == layout.PRETRAIN:
        name = f"{group}/{arm}"
        group = os.path.basename(os.path.dirname(run_dir))
    sinks = []
    try:
        for tracker in log_to:
            if tracker == "tensorboard":
                sinks.append(TensorBoardSink(os.path.join(arm_dir, "tensorboard"), config))
            elif tracker == "wandb":
                sinks.append(WandbSink(group, name, os.path.dirname(os.path.abspath(arm_dir)), config))
    except BaseException:
        Sinks(sinks).close()
        raise
    return Sinks(sinks)


__all__ = ["TRACKERS", "Sinks", "build_sinks", "flat_config", "scalars"]
