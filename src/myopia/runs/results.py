"""What every experiment command shares: the results envelope and how it is written.

``results.json`` always starts with the same five keys, then the experiment's own::

    {"experiment": "lm", "status": "completed", "config": {...}, "environment": {...},
     "resources": {"wall_seconds": ..., "peak_rss_mib": ...}, ...}

:class:`Results` holds them (item access reads and writes the experiment's own keys);
:func:`recording` marks a run ``failed`` (with the error) or ``interrupted`` if it ends by an
exception, and :meth:`Results.write` writes ``results.json`` atomically. ``report.md`` is written by
:func:`write_report`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum

import torch

import myopia
from myopia.runs.drift import recorded_changes
from myopia.train.checkpoint import atomic_write_text


class Status(str, Enum):
    """Where a run stands: written as its value (``"completed"``, ...)."""

    RUNNING = "running"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


def environment() -> dict:
    """The machine, library versions and date a result was measured with."""
    from myopia.train.loop import resolve_device

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


COMMAND_STARTED = time.perf_counter()
"""When this process imported the experiments (the command's start, before any data is read)."""


def peak_rss_mib() -> float | None:
    """This process's peak resident memory in MiB (None where the platform does not say): Linux's VmHWM,
    which starts afresh when the program starts (getrusage's maxrss keeps what a forking parent had)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if platform.system() == "Darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


@dataclass
class Results:
    """One run's results: the envelope (experiment, status, config, environment) and its own keys."""

    experiment: str
    config: object
    """The resolved configuration (a dataclass or a dict)."""
    status: Status = Status.RUNNING
    environment: dict = field(default_factory=environment)
    body: dict = field(default_factory=dict)
    written: bool = field(default=False, repr=False)
    """Whether this run has written its results.json yet."""

    def __getitem__(self, key: str):
        return self.body[key]

    def __setitem__(self, key: str, value) -> None:
        self.body[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self.body

    def get(self, key: str, default=None):
        return self.body.get(key, default)

    def update(self, values: dict) -> None:
        self.body.update(values)

    def to_dict(self) -> dict:
        from myopia.train.loop import stopped_by

        config = asdict(self.config) if is_dataclass(self.config) else dict(self.config)
        data = {"experiment": self.experiment, "status": Status(self.status).value, "config": config,
                "environment": self.environment, "resources": self.resources(), **self.body}
        if self.status == Status.INTERRUPTED and stopped_by():
            data["stopped_by"] = stopped_by()  # SIGINT (Ctrl-C), or a scheduler's SIGTERM / SIGUSR1
            data["stopped_in"] = stage()  # training an arm (saved), or scoring, analysing, reporting
        return data

    def resources(self) -> dict:
        """What this command has used so far: wall time since it started (a resumed run counts from its
        restart; in a sweep, every model's run counts from the sweep's start) and the process's peak
        memory."""
        out = {"wall_seconds": round(time.perf_counter() - COMMAND_STARTED, 1), "peak_rss_mib": peak_rss_mib()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    def write(self, out: str, status: Status | None = None) -> dict:
        """Set ``status`` (if given) and write ``out/results.json`` atomically; return the dict."""
        if status is not None:
            self.status = status
        data = self.to_dict()
        changes = recorded_changes(out) if os.path.isdir(out) else []
        if changes:  # --resume with --train.allow_changes: the recipe changed mid-run, on record
            data["config_changes"] = changes
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "results.json"), json.dumps(data, indent=1, default=float))
        self.written = True
        return data


_STAGE = ["setting up"]


def set_stage(text: str) -> None:
    """What the command is doing now (``training arm myopic in runs/x/seed0``, ``scoring ...``): a run
    stopped by a signal records it in results.json as ``stopped_in``."""
    _STAGE[0] = text


def stage() -> str:
    return _STAGE[0]


@contextmanager
def recording(results: Results, out: str, write: bool = True) -> Iterator[Results]:
    """Run the body; if it raises, record the run as ``interrupted`` (Ctrl-C) or ``failed`` (with the
    error's one line) in ``out/results.json`` and re-raise. Another run's results.json (e.g. a completed
    run in the same ``out``, refused without --resume) is never overwritten: the failure is written
    only where this run has written before, or where there is none."""
    from myopia.train.loop import Preempted

    try:
        yield results
    except BaseException as exc:
        mine = results.written or not os.path.exists(os.path.join(out, "results.json"))
        if write and os.path.isdir(out) and mine and results.status == Status.RUNNING:
            if isinstance(exc, (KeyboardInterrupt, Preempted)):
                results.write(out, Status.INTERRUPTED)
            elif isinstance(exc, Exception):
                results["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                results.write(out, Status.FAILED)
        raise


def write_report(out: str, lines: list[str]) -> str:
    """Write ``out/report.md`` from its lines; return its path."""
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def publish(out: str, data: dict, write: Callable[[str, dict], object], summary: Callable[[dict], str]) -> dict:
    """A completed run's last step: its report and plots (``write(out, data)``), its summary printed,
    and where they went; returns ``data``."""
    write(out, data)
    print(summary(data), flush=True)
    print(f"wrote {os.path.join(out, 'results.json')}, report.md and plots", flush=True)
    return data


__all__ = ["Results", "Status", "environment", "peak_rss_mib", "publish", "recording", "set_stage", "stage",
           "write_report"]
