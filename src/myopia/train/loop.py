"""The one training loop every experiment shares.

Data is a pure function of (seed, step) (see :func:`myopia.tasks.base.batch_generator`), the learning
rate a pure function of the step, and checkpoints hold weights, optimiser and RNG state: so arms of an
experiment see identical batches, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from myopia.tasks.base import Task, loss_mask, model_loss, position_losses
from myopia.train.layout import checkpoints_dir, metrics_path
from myopia.train.checkpoint import (
    CheckpointError,
    capture,
    damage_report,
    gather_rng,
    is_sharded,
    latest_checkpoint,
    load_sharded,
    read_checkpoint,
    restore,
    restore_rng,
    rng_for_rank,
    save_checkpoint,
    save_sharded_checkpoint,
    set_aside_damaged,
)
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.distributed import Dist, no_grad_sync, parallelize
from myopia.train.optim import build_optimizer, lr_at
from myopia.train.precision import autocast_for, cpu_has_native_bf16, describe, resolve_precision  # noqa: F401


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss."""


class RunDirectoryError(RuntimeError):
    """The run directory holds an earlier run and neither resume nor a new folder was asked for."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use --train.device cpu")
    return torch.device(name)


PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
"""What a scheduler sends before it kills a job (SLURM's --signal, Kubernetes and torchrun send SIGTERM):
handled like Ctrl-C: finish the step, save a checkpoint, stop (docs/cluster.md)."""


EXIT_PREEMPTED = 75
"""The exit code of a run stopped by SIGTERM or SIGUSR1 after saving its checkpoint (sysexits'
EX_TEMPFAIL: "try again later"): a job script requeues on it. Ctrl-C exits 130, errors 1 or 2."""

_stopped_by: list[str | None] = [None]


def stopped_by() -> str | None:
    """The signal that stopped training in this process (``SIGINT``, ``SIGTERM``, ``SIGUSR1``), or None."""
    return _stopped_by[0]


def forget_stop() -> None:
    """Clear :func:`stopped_by` (the CLI does at the start of every command)."""
    _stopped_by[0] = None


@dataclass
class StopSignal:
    """Set by Ctrl-C, SIGTERM, SIGUSR1 (or a callback): the loop saves a checkpoint at the next step
    boundary and returns. ``signal`` names what asked (None for a callback)."""

    requested: bool = False
    signal: str | None = None

    def request(self, name: str | None = None) -> None:
        self.requested = True
        self.signal = self.signal or name
        _stopped_by[0] = _stopped_by[0] or name  # what stopped this process, for the CLI's exit code
    @property
    def preempted(self) -> bool:
        """Stopped by a scheduler's signal (not by a person's Ctrl-C)."""
        return self.signal in PREEMPTION_SIGNALS


class Preempted(BaseException):
    """A scheduler's SIGTERM or SIGUSR1 outside the training loop (setting up, scoring, analysing,
    reporting): raised where the command is, so that it unwinds at once, ``results.json`` records the
    signal and the stage (``stopped_by``, ``stopped_in``) and the process exits with
    :data:`EXIT_PREEMPTED`. Inside the loop the same signals finish the step and save instead
    (:func:`graceful_interrupt`). A BaseException, as KeyboardInterrupt, so that no ``except
    Exception`` swallows it."""

    def __init__(self, name: str):
        super().__init__(f"stopped by {name}")
        self.signal = name


@contextlib.contextmanager
def preemption_handlers() -> Iterator[None]:
    """A command's signal handling outside the training loop: the first SIGTERM or SIGUSR1 raises
    :class:`Preempted`; repeats are ignored while it unwinds (schedulers send the signal more than
    once). The loop installs its own handlers over these while it trains and restores them after."""
    raised: list[str] = []

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if raised:
            return
        raised.append(name)
        _stopped_by[0] = _stopped_by[0] or name
        raise Preempted(name)

    previous = {}
    try:
        for name in PREEMPTION_SIGNALS:
            if hasattr(signal, name):
                previous[getattr(signal, name)] = signal.signal(getattr(signal, name), handler)
    except ValueError:  # not the main thread: leave the signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def graceful_interrupt(stop: StopSignal) -> Iterator[StopSignal]:
    """The first SIGINT, SIGTERM or SIGUSR1 asks the loop to save and stop. A second Ctrl-C (SIGINT)
    interrupts at once (a checkpoint being written is then abandoned whole: the previous one stays
    loadable); a repeated SIGTERM/SIGUSR1 is ignored, since schedulers send them more than once (SLURM
    to every process of a step, torchrun forwarding its own) and kill with SIGKILL when out of patience."""
    handled = [getattr(signal, name) for name in ("SIGINT", *PREEMPTION_SIGNALS) if hasattr(signal, name)]

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.requested:
            if name == "SIGINT":
                raise KeyboardInterrupt
            return  # a scheduler repeats itself (SLURM signals every process, torchrun forwards): keep saving
        stop.request(name)
        tqdm.write(f"{name}: saving a checkpoint at the end of this step (Ctrl-C to abort now)")

    previous = {}
    try:
        for sig in handled:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave the signals alone
        for sig, old in previous.items():
            signal.signal(sig, old)
        yield stop
        return
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, n_batches: int, batch_size: int, device: torch.device,
             precision: str = "auto", dist: Dist | None = None) -> dict:
    """Mean held-out loss and loss per position over the task's fixed held-out batches
    (each process scores its slice of every batch; the sums are combined)."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    total = torch.zeros(task.seq_len, dtype=torch.float64, device=device)
    masked = torch.zeros(task.seq_len, dtype=torch.float64, device=device)  # tasks with a loss mask
    count = 0
    with autocast_for(device, precision):
        for i in range(n_batches):
            x, y = task.heldout_batch(i, batch_size)
            x, y = dist.shard(x), dist.shard(y)
            y = y.to(device)
            losses = position_losses(task, model, x.to(device), y).double()
            mask = loss_mask(task, y)
            if mask is not None:
                losses = torch.where(mask, losses, 0.0)
                masked += mask.double().sum(0)
            total += losses.sum(0)
            count += x.shape[0]
    model.train(was_training)
    total = dist.sum(total)
    if hasattr(task, "loss_mask"):  # the mean over masked tokens; positions that never carry loss are None
        masked = dist.sum(masked)
        per_position = [t / c if c > 0 else None for t, c in zip(total.cpu().tolist(), masked.cpu().tolist())]
        return {"loss": (total.sum() / masked.sum().clamp(min=1)).item(), "per_position": per_position}
    per_position = (total / (count * dist.world)).cpu()
    return {"loss": per_position.mean().item(), "per_position": per_position.tolist()}


class MetricsLog:
    """Metrics as JSON lines (one object per line), flushed at every write."""

    def __init__(self, path: str, keep_through_step: int | None = None, enabled: bool = True, sink=None):
        self.path, self.enabled, self.sink = path, enabled, sink  # sink: trackers (train.trackers)
        if not enabled:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if keep_through_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= keep_through_step]
            with open(path, "w") as f:
                f.writelines(kept)
        elif keep_through_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.sink is not None:
            self.sink.log(record)

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(ln) for ln in f if ln.strip()]


def _model_config(model: torch.nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") and hasattr(config, "n_layer") else None


@dataclass
class ArmResult:
    arm: str
    status: str
    steps: int
    final_train_loss: float | None
    eval: dict | None
    seconds: float
    tokens: int
    checkpoint: str | None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def use_deterministic_kernels() -> None:
    """Make CUDA kernels deterministic where PyTorch can (flash attention's backward included);
    operations without a deterministic kernel warn instead of failing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def train_arm(
    model: torch.nn.Module,
    task: Task,
    optim_cfg: OptimConfig,
    cfg: TrainConfig,
    arm_dir: str,
    arm: str,
    resume: bool = False,
    stop: StopSignal | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    dist: Dist | None = None,
    monitor: Callable[[torch.nn.Module, int, torch.optim.Optimizer], dict | None] | None = None,
    sink=None,
) -> ArmResult:
    """Train ``model`` on ``task`` for ``cfg.steps`` optimiser steps; write metrics and checkpoints
    under ``arm_dir`` (rank 0 only). Returns when done or when ``stop`` is requested (after saving).

    ``model`` is the bare model: data parallelism (``dist``) is applied here, from outside it.
    ``monitor(model, step, optimizer)`` runs at step 0 of a fresh run and after every step, on the
    bare model (the optimiser for reading its moments); a dict it returns is written to
    ``metrics.jsonl`` with the step. It must leave the weights, ``.grad``, the optimiser and the RNG
    as it found them (an exact resume depends on it).
    ``sink.log(record)`` (trackers: :mod:`myopia.train.trackers`) gets every record ``metrics.jsonl`` gets.
    """
    dist = dist or Dist()
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        use_deterministic_kernels()
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    model.to(device).train()
    ckpt_dir = checkpoints_dir(arm_dir)
    latest, damage = dist.broadcast_object(
        (latest_checkpoint(ckpt_dir), damage_report(ckpt_dir)) if dist.is_main else None)
    if (latest is not None or damage is not None) and not resume:
        raise RunDirectoryError(
            f"{arm_dir} already holds a run of arm {arm!r}; pass --resume to continue it or choose a new --out")
    if latest is None and damage is not None:  # never a silent restart: the run's work is in those folders
        if not cfg.discard_damaged:
            raise CheckpointError(
                f"arm {arm!r}: {ckpt_dir} holds no intact checkpoint ({damage}); nothing was changed. Start in a new "
                "--out, or pass --train.discard_damaged to move the damaged checkpoints aside and train this arm "
                "again from step 0")
        if dist.is_main:
            moved = set_aside_damaged(arm_dir)
            tqdm.write(f"[{arm}] no intact checkpoint ({damage}); moved aside to {moved}; training from step 0")
        dist.barrier()
    resolved = resolve_precision(device, cfg.precision)
    sharded = dist.enabled and cfg.parallel == "fsdp"  # FSDP saves and loads per-rank shards (train/checkpoint.py)
    wrapped = parallelize(model, dist, cfg.parallel, device)
    optimizer = build_optimizer(wrapped, optim_cfg)
    start_step, seconds_before, tokens_before, last_eval = 0, 0.0, 0, None
    if latest is not None:
        if sharded and is_sharded(latest):
            state, rng = load_sharded(latest, wrapped, optimizer, verified=True)  # rank 0 verified it above
        else:
            weights, optim_state, state, rng = read_checkpoint(latest)
            restore(wrapped, optimizer, weights, optim_state)
        restore_rng(rng_for_rank(rng, dist.rank, dist.world))
        saved_precision = state.get("precision")
        if saved_precision not in (None, resolved) and "train.precision" not in cfg.allow_changes:
            raise CheckpointError(
                f"arm {arm!r}: {latest} was trained in {saved_precision}, and train.precision {cfg.precision} means "
                f"{resolved} on this {device.type} ({describe(device, cfg.precision)['reason']}); resume with "
                f"--train.precision {saved_precision}, or accept the change on record with --train.allow_changes "
                "train.precision")
        start_step, last_eval = state["step"], state.get("eval")
        if start_step == 0:
            optimizer.state.clear()  # see checkpoint(): before the first update there is no optimiser state
        seconds_before, tokens_before = state.get("seconds", 0.0), state.get("tokens", 0)
        if dist.is_main:
            tqdm.write(f"[{arm}] resuming from {latest} (step {start_step}/{cfg.steps})")
    log = MetricsLog(metrics_path(arm_dir), keep_through_step=start_step if latest else None,
                     enabled=dist.is_main, sink=sink)
    stop = stop or StopSignal()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * task.seq_len
    last_loss, last_ckpt = None, latest
    t0 = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0

    def checkpoint(step: int, status: str) -> str | None:
        state = {"arm": arm, "status": status, "seconds": seconds_before + time.perf_counter() - t0,
                 "tokens": tokens_before + (step - start_step) * tokens_per_step, "eval": last_eval,
                 "world_size": dist.world, "model_config": _model_config(model), "precision": resolved}
        if sharded:  # no rank gathers the full state
            path = save_sharded_checkpoint(ckpt_dir, step, wrapped, optimizer, state, dist, keep=cfg.keep_checkpoints)
            if step == 0:
                optimizer.state.clear()
            return path
        model_state, optim_state = capture(wrapped, optimizer)
        if step == 0:
            # torch's state-dict API gives an optimiser without state one by taking a zero-gradient step
            # (AdamW's step count becomes 1, and the next update's bias correction differs): before the
            # first update, neither this run nor one resumed from this checkpoint may keep it.
            optimizer.state.clear()
        rng = gather_rng(dist)  # every rank's generators (a collective), saved by rank 0
        path = None
        if dist.is_main:
            path = save_checkpoint(ckpt_dir, step, model_state, optim_state, state, keep=cfg.keep_checkpoints, rng=rng)
        dist.barrier()
        return dist.broadcast_object(path)

    bar = tqdm(total=cfg.steps, initial=start_step, desc=arm, disable=not (cfg.progress and dist.is_main),
               dynamic_ncols=True, unit="step", leave=True)
    step = start_step

    def run_monitor() -> None:
        extra = monitor(model, step, optimizer) if monitor is not None else None
        if extra:
            log.write({"step": step, **extra})

    try:
        if start_step == 0 and latest is None:  # a checkpoint at step 0 was saved after these had run
            if cfg.eval_on_start:
                last_eval = evaluate(wrapped, task, cfg.eval_batches, cfg.batch_size, device, cfg.precision, dist)
                log.write({"step": 0, "eval_loss": last_eval["loss"]})
            run_monitor()
        stopping = False
        while step < cfg.steps:
            if stopping:  # decided with the last step's loss all-reduce: every rank stops after the same step
                name = next((n for n in dist.all_objects(stop.signal) if n), None)
                stop.request(name)  # every rank now knows what stopped the run
                last_ckpt = checkpoint(step, "interrupted")
                if dist.is_main:
                    tqdm.write(f"[{arm}] stopped at step {step}; checkpoint {last_ckpt}")
                break
            if stop.requested and not dist.enabled:
                stopping = True
                continue
            lr = lr_at(step, cfg.steps, optim_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = task.train_batch(step, micro, cfg.batch_size)
                x, y = dist.shard(x).to(device, non_blocking=True), dist.shard(y).to(device, non_blocking=True)
                with no_grad_sync(wrapped, sync=micro == cfg.grad_accum - 1):
                    with autocast_for(device, cfg.precision):
                        loss = model_loss(task, wrapped, x, y) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            # a signal may reach only some ranks: the stop flag rides the loss's all-reduce
            mean_loss, stopping = dist.mean_and_any(loss_sum, stop.requested)
            loss_value = float(mean_loss)
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(
                    f"arm {arm!r}: loss became {loss_value} at step {step}; last good checkpoint: "
                    f"{last_ckpt or 'none'}. Lower --optim.lr or raise --optim.warmup")
            grad_norm = None
            if optim_cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), optim_cfg.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_value
            window_tokens += tokens_per_step
            record = {"step": step, "loss": loss_value, "lr": lr}
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:  # step 1: the start's training loss
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                record.update(grad_norm=grad_norm, tokens_per_s=round(tok_s, 1),
                              elapsed_s=round(seconds_before + now - t0, 3))
                log.write(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if ((cfg.eval_every and step % cfg.eval_every == 0) or step in cfg.eval_at) and step < cfg.steps:
                last_eval = evaluate(wrapped, task, cfg.eval_batches, cfg.batch_size, device, cfg.precision, dist)
                log.write({"step": step, "eval_loss": last_eval["loss"]})
                bar.set_postfix(loss=f"{loss_value:.4f}", eval=f"{last_eval['loss']:.4f}", refresh=False)
            run_monitor()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                last_ckpt = checkpoint(step, "running")
            bar.update(1)
            if on_step is not None:
                on_step(step, record)
    finally:
        bar.close()
    status = "completed" if step >= cfg.steps else "interrupted"
    if status == "completed":
        if start_step < cfg.steps or last_eval is None:
            last_eval = evaluate(wrapped, task, cfg.eval_batches, cfg.batch_size, device, cfg.precision, dist)
            log.write({"step": step, "eval_loss": last_eval["loss"]})
        if start_step < cfg.steps:
            last_ckpt = checkpoint(step, "completed")
    history = log.read() if dist.is_main else []
    if last_loss is None:
        train_losses = [r["loss"] for r in history if "loss" in r]
        last_loss = train_losses[-1] if train_losses else None
    return ArmResult(arm=arm, status=status, steps=step, final_train_loss=last_loss, eval=last_eval,
                     seconds=round(seconds_before + time.perf_counter() - t0, 3),
                     tokens=tokens_before + (step - start_step) * tokens_per_step,
                     checkpoint=last_ckpt, history=history)
