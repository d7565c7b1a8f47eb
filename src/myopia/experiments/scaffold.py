"""What every experiment command shares: the results envelope and how it is written.

``results.json`` always starts with the same four keys, then the experiment's own::

    {"experiment": "lm", "status": "completed", "config": {...}, "environment": {...}, ...}

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum

import torch

import myopia
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
        config = asdict(self.config) if is_dataclass(self.config) else dict(self.config)
        return {"experiment": self.experiment, "status": Status(self.status).value, "config": config,
                "environment": self.environment, **self.body}

    def write(self, out: str, status: Status | None = None) -> dict:
        """Set ``status`` (if given) and write ``out/results.json`` atomically; return the dict."""
        if status is not None:
            self.status = status
        data = self.to_dict()
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "results.json"), json.dumps(data, indent=1, default=float))
        self.written = True
        return data


@contextmanager
def recording(results: Results, out: str, write: bool = True) -> Iterator[Results]:
    """Run the body; if it raises, record the run as ``interrupted`` (Ctrl-C) or ``failed`` (with the
    error's one line) in ``out/results.json`` and re-raise. Another run's results.json (e.g. a completed
    run in the same ``out``, refused without --resume) is never overwritten: the failure is written
    only where this run has written before, or where there is none."""
    try:
        yield results
    except BaseException as exc:
        mine = results.written or not os.path.exists(os.path.join(out, "results.json"))
        if write and os.path.isdir(out) and mine and results.status == Status.RUNNING:
            if isinstance(exc, KeyboardInterrupt):
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


__all__ = ["Results", "Status", "environment", "recording", "write_report"]
