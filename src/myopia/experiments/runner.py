"""Run the arms of one experiment one after another and collect ``results.json``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

import myopia
from myopia.config import dump_yaml
from myopia.experiments.arms import Arm
from myopia.tasks.base import Task
from myopia.train.checkpoint import atomic_write_text
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.distributed import setup
from myopia.train.trackers import build_sinks
from myopia.train.loop import (
    ArmResult,
    StopSignal,
    graceful_interrupt,
    resolve_device,
    train_arm,
)


def environment() -> dict:
    device = resolve_device("auto")
    return {
        "myopia": myopia.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_arms(
    out_dir: str,
    config: object,
    arms: list[Arm],
    task: Task,
    make_model: Callable[[Arm], torch.nn.Module],
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    resume: bool = False,
    on_arm_done: Callable[[Arm, torch.nn.Module, ArmResult], None] | None = None,
    monitor_for: Callable[[Arm, torch.nn.Module], Callable | None] | None = None,
) -> dict:
    """Train every arm in ``out_dir/<arm>/`` and return (and write) the results dict.

    Under torchrun every process runs this; only rank 0 writes files and prints.
    ``monitor_for(arm, model)`` may give each arm's training loop a monitor (``train_arm``).
    """
    dist = setup(train_cfg.device)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        dump_yaml(config, os.path.join(out_dir, "config.yaml"))
    results = {"config": _plain(config), "environment": environment(), "arms": {}}
    stop = StopSignal()
    with graceful_interrupt(stop):
        for arm in arms:
            model = make_model(arm)
            arm_dir = os.path.join(out_dir, arm.name)
            sink = build_sinks(train_cfg.log_to, arm_dir, arm.name, results["config"]) if dist.is_main else None
            try:
                result = train_arm(model, task, optim_cfg, train_cfg, arm_dir, arm.name,
                                   resume=resume, stop=stop, dist=dist,
                                   monitor=monitor_for(arm, model) if monitor_for is not None else None, sink=sink)
            finally:
                if sink is not None:
                    sink.close()
            summary = result.to_dict()
            summary.pop("history")
            results["arms"][arm.name] = summary
            if dist.is_main:
                write_results(out_dir, results)
            if result.status != "completed":
                results["status"] = "interrupted"
                break
            if on_arm_done is not None:
                on_arm_done(arm, model, result)
            ev = result.eval["loss"] if result.eval else float("nan")
            if dist.is_main:
                tqdm.write(f"[{arm.name}] held-out loss {ev:.4f}  (train {result.final_train_loss:.4f}, "
                           f"{result.seconds:.0f} s)")
    results.setdefault("status", "completed")
    if dist.is_main:
        write_results(out_dir, results)
    return results


def _plain(config: object) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(config) if is_dataclass(config) else dict(config)


def write_results(out_dir: str, results: dict) -> None:
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=float))
