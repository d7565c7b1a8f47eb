"""Run the arms of one experiment one after another and collect ``results.json``."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from myopia.config import dump_yaml, to_dict
from myopia.runs.arms import Arm, check_arms_fit
from myopia.runs.drift import check_resume, field_defaults
from myopia.runs.results import Results, Status, set_stage
from myopia.tasks.base import Task
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.distributed import setup
from myopia.train.checkpoint import checkpoint_step, damage_report, latest_checkpoint
from myopia.train.layout import checkpoints_dir, config_path
from myopia.train.memory import release_freed_memory
from myopia.train.loop import ArmResult, RunDirectoryError, StopSignal, graceful_interrupt, train_arm
from myopia.train.trackers import build_sinks


def _holds_run(ckpt_dir: str) -> bool:
    """Whether an arm's checkpoints folder holds a run: an intact checkpoint or damaged ones."""
    return latest_checkpoint(ckpt_dir, log=lambda *_: None) is not None or damage_report(ckpt_dir) is not None


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
    experiment: str = "arms",
) -> dict:
    """Train every arm in ``out_dir/<arm>/`` and return (and write) the results dict.

    Under torchrun every process runs this; only rank 0 writes files and prints.
    ``monitor_for(arm, model)`` may give each arm's training loop a monitor (``train_arm``).
    ``experiment`` names the results (``train`` for ``myopia train``; ``arms`` for the sub-runs of
    other experiments).
    """
    dist = setup(train_cfg.device)
    if not resume:  # refused before anything is written: config.yaml stays the recorded recipe
        held = [arm.name for arm in arms if _holds_run(checkpoints_dir(os.path.join(out_dir, arm.name)))]
        if held:
            raise RunDirectoryError(f"{os.path.join(out_dir, held[0])} already holds a run of arm {held[0]!r}; pass "
                                    "--resume to continue it or choose a new --out")
    if resume:  # the recipe must be the run's own (runs/drift.py); every rank checks, so all stop together
        steps = {arm.name: checkpoint_step(latest_checkpoint(checkpoints_dir(os.path.join(out_dir, arm.name)),
                                                             verified=False)) for arm in arms}
        check_resume(out_dir, config_path(out_dir), to_dict(config) if not isinstance(config, dict) else config,
                     train_cfg.allow_changes, steps, record=dist.is_main,
                     defaults=None if isinstance(config, dict) else field_defaults(type(config)))
        dist.barrier()  # every rank has read the old config.yaml before rank 0 replaces it
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        dump_yaml(config, config_path(out_dir))
    results = Results(experiment, config, body={"arms": {}})
    stop = StopSignal()
    for index, arm in enumerate(arms):
        set_stage(f"training arm {arm.name} in {out_dir}")
        release_freed_memory()  # what the last arm (or the start's scoring) freed: the heap would keep it, fragmented
        model = make_model(arm)
        if index == 0:
            check_arms_fit(arms, model)  # a cut naming a missing block fails before anything trains
        arm_dir = os.path.join(out_dir, arm.name)
        sink = build_sinks(train_cfg.log_to, arm_dir, arm.name, results.to_dict()["config"]) if dist.is_main else None
        try:
            with graceful_interrupt(stop):  # only while training: elsewhere a signal stops at once (Preempted)
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
            results.write(out_dir)
        if result.status != Status.COMPLETED:
            results.status = Status.INTERRUPTED
            break
        if on_arm_done is not None:
            set_stage(f"after training arm {arm.name} in {out_dir} (scoring)")
            release_freed_memory()  # the optimiser's state and the last step's buffers, before scoring
            on_arm_done(arm, model, result)
        del model  # before the next arm's model is built: one model in memory at a time
        ev = result.eval["loss"] if result.eval else float("nan")
        if dist.is_main:
            tqdm.write(f"[{arm.name}] held-out loss {ev:.4f}  (train {result.final_train_loss:.4f}, "
                       f"{result.seconds:.0f} s)")
    if results.status == Status.RUNNING:
        results.status = Status.COMPLETED
    if dist.is_main:
        results.write(out_dir)
    return results.to_dict()
