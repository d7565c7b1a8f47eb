"""Every attempt at a run, recorded in its folder: ``<out>/attempts.jsonl``.

A job script that requeues a preempted run must know how *this* attempt ended, not what an earlier
attempt's ``results.json`` says (a crash after one preemption would otherwise be requeued forever).
The ``myopia`` command line appends one line when a command starts (right after its configuration
is resolved, before anything else can fail) and one when it ends, each naming the attempt:

    {"attempt": "4242.1", "event": "started", "time": ..., "host": ..., "pid": ..., "argv": [...]}
    {"attempt": "4242.1", "event": "ended", "outcome": "preempted", "exit_code": 75, "stage": ...}

``attempt`` is ``$MYOPIA_ATTEMPT`` when the job script sets it (the SLURM recipe uses
``$SLURM_JOB_ID.$SLURM_RESTART_COUNT``), else a fresh id. ``outcome`` is ``completed``, ``preempted``
(SIGTERM/SIGUSR1, checkpoint saved: exit 75), ``interrupted`` (Ctrl-C: 130), ``failed`` (with the
error's one line) or, for an attempt killed without a word (SIGKILL, out of memory), no ``ended``
line at all. Only rank 0 writes.

``python -m myopia.runs.attempts OUT ATTEMPT`` prints that attempt's outcome (``none`` if it never
ended) and exits 0 only for ``preempted``: what a job script asks before it requeues.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid

FILE = "attempts.jsonl"
OUTCOMES = ("completed", "preempted", "interrupted", "failed")


def attempt_id() -> str:
    """This attempt's id: ``$MYOPIA_ATTEMPT``, or one made up for this process (and kept)."""
    if not os.environ.get("MYOPIA_ATTEMPT"):
        os.environ["MYOPIA_ATTEMPT"] = uuid.uuid4().hex[:12]
    return os.environ["MYOPIA_ATTEMPT"]


def _append(out: str, record: dict) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def record_start(out: str, argv: list[str]) -> None:
    """Append this attempt's ``started`` line to ``out/attempts.jsonl``."""
    _append(out, {"attempt": attempt_id(), "event": "started", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "host": socket.gethostname(), "pid": os.getpid(), "argv": list(argv),
                  "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")})


def record_end(out: str, outcome: str, exit_code: int, error: str | None = None, stage: str | None = None) -> None:
    """Append this attempt's ``ended`` line (``outcome`` one of :data:`OUTCOMES`)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    record = {"attempt": attempt_id(), "event": "ended", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "outcome": outcome, "exit_code": exit_code}
    if error:
        record["error"] = error
    if stage:
        record["stage"] = stage
    _append(out, record)


def read(out: str) -> list[dict]:
    path = os.path.join(out, FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def outcome(out: str, attempt: str) -> str:
    """How attempt ``attempt`` of the run in ``out`` ended: one of :data:`OUTCOMES`, or ``none`` (never
    started, or killed without ending; under torchrun's restarts the last ending counts)."""
    ended = [r for r in read(out) if r.get("attempt") == attempt and r.get("event") == "ended"]
    return ended[-1]["outcome"] if ended else "none"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m myopia.runs.attempts OUT ATTEMPT  (prints the outcome; exit 0 only if preempted)",
              file=sys.stderr)
        return 2
    result = outcome(*args)
    print(result)
    return 0 if result == "preempted" else 1


__all__ = ["FILE", "OUTCOMES", "attempt_id", "outcome", "read", "record_end", "record_start"]


if __name__ == "__main__":
    sys.exit(main())
