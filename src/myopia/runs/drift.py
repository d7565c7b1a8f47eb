"""Configuration drift on ``--resume``: a resumed run must continue under the recipe its ``config.yaml`` names.

:func:`check_resume` compares the configuration a ``--resume`` brings with the one the run folder was
started with, key by dotted key. Keys that cannot change a trajectory (:data:`SAFE_KEYS`: logging,
progress, evaluation and checkpoint cadence, device, trackers) and the sections of measurements made
after training (:data:`SAFE_SECTIONS`: the future lens) pass; the lists of runs a grid holds
(:data:`GROWABLE_KEYS`: seeds, arms, ...) may gain entries, which train as new runs beside the old ones.
Any other change (model, data, optimiser, schedule, steps, precision, cut, ...) is refused in one line
that names each changed key with its old and new value, unless ``train.allow_changes`` names the key:
then the change is recorded, with the step each arm resumes from, in the run folder's
``config_changes.jsonl`` and in ``results.json`` (:func:`recorded_changes`).

A key the recorded recipe lacks (a setting added to myopia after the run started) is no change
while it has its default: a new setting's default keeps what myopia did before it existed.

``train.steps`` is not safe to extend: the learning rate follows warm-up and a cosine decay over all
steps, so a longer run has another schedule from step 0 on (allow it explicitly to continue anyway).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass

import yaml

from myopia.config import ConfigError

SAFE_KEYS = frozenset({
    "out", "resume", "train.progress", "train.log_every", "train.eval_every", "train.eval_at", "train.eval_batches",
    "train.eval_on_start", "train.checkpoint_every", "train.keep_checkpoints", "train.device", "train.log_to",
    "train.deterministic", "train.parallel", "train.allow_changes", "train.discard_damaged",
})
"""Keys a resumed run may change freely: they decide what is logged, evaluated, saved or shown, and
where it runs, never which updates the weights get (train.device, train.parallel and
train.deterministic change the floating-point order, as any other machine would). Except
:data:`SAFE_UNLESS`: keys that change the numerics through another setting."""

SAFE_SECTIONS = ("future_lens.",)
"""Sections whose every key a resumed run may change: measurements of the trained models (myopia lm's
future lens) that never touch training, each cached under its own settings, so a changed setting
measures again what it changes and keeps the rest."""

SAFE_UNLESS = {"train.device": ("train.precision", "auto")}
"""``{key: (other key, value)}``: ``key`` is safe only while ``other key`` has another value in both
configurations. Under ``train.precision auto`` the device decides the precision (bf16 autocast on
CUDA, float32 or bf16 on a CPU by its bf16 units), so moving a run between devices changes its
arithmetic, not only its order."""

GROWABLE_KEYS = frozenset({"seeds", "arms", "control_arms", "pairs", "p_values", "shifts", "pads", "modes",
                           "context_lengths", "models"})
"""Top-level lists of runs: a resumed run may add entries (new runs, trained fresh); removing or
changing one is a change like any other."""

CHANGES_FILE = "config_changes.jsonl"


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists stay values)."""
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def field_defaults(cls: type) -> dict[str, object]:
    """``{dotted key: default}`` for every field of the dataclass ``cls`` (nested ones included) that
    has a default, as :func:`flatten` names them."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            out.update(flatten({f.name: dataclasses.asdict(value)}))
        else:
            out[f.name] = value
    return out


def _grows(old: object, new: object) -> bool:
    return isinstance(old, list) and isinstance(new, list) and all(item in new for item in old)


def _safe(key: str, a: dict, b: dict) -> bool:
    if key.startswith(SAFE_SECTIONS):
        return True
    if key not in SAFE_KEYS:
        return False
    if key in SAFE_UNLESS:
        other, value = SAFE_UNLESS[key]
        return value not in (a.get(other), b.get(other))
    return True


def config_changes(old: dict, new: dict, defaults: dict[str, object] | None = None) -> list[Change]:
    """Every dotted key whose value differs between the two configurations and that is neither safe,
    nor a grown list of runs, nor a key ``old`` lacks that ``new`` holds at its default
    (``defaults``: :func:`field_defaults` of the configuration's class)."""
    a, b = flatten(old), flatten(new)
    defaults = defaults or {}
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == vb or _safe(key, a, b) or (key in GROWABLE_KEYS and _grows(va, vb)):
            continue
        if key not in a and key in defaults and vb == defaults[key]:
            continue
        changes.append(Change(key, va, vb))
    return changes


def check_resume(run_dir: str, saved_config: str, new: dict, allowed: list[str],
                 steps: dict[str, int] | None = None, record: bool = True,
                 defaults: dict[str, object] | None = None) -> list[Change]:
    """Refuse a resume of ``run_dir`` whose configuration ``new`` differs from ``saved_config`` (the
    run's config.yaml) in a key that changes the trajectory, unless ``allowed`` names it; record the
    allowed changes (and ``steps``, each arm's resume step) in ``run_dir/config_changes.jsonl``.
    Returns the allowed changes (under torchrun every rank checks; only ``record`` writes)."""
    if not os.path.isfile(saved_config):
        return []
    with open(saved_config) as f:
        old = yaml.safe_load(f) or {}
    changes = config_changes(old, new, defaults)
    refused = [c for c in changes if c.key not in allowed]
    if refused:
        listed = "; ".join(str(c) for c in refused)
        keys = ",".join(c.key for c in refused)
        raise ConfigError(
            f"--resume of {run_dir} with a different recipe than its config.yaml: {listed}. Resume with the "
            f"run's own values, start a new --out, or accept the change on record with --train.allow_changes {keys}")
    if changes and record:
        with open(os.path.join(run_dir, CHANGES_FILE), "a") as f:
            for c in changes:
                f.write(json.dumps({"key": c.key, "old": c.old, "new": c.new, "steps": steps or {}}, default=str) + "\n")
    return changes


def recorded_changes(out: str) -> list[dict]:
    """Every change recorded under ``out`` (its own folder and its seed/condition folders), each with
    the folder it applies to (relative to ``out``)."""
    found = []
    for path in sorted(glob.glob(os.path.join(out, "**", CHANGES_FILE), recursive=True)):
        folder = os.path.relpath(os.path.dirname(path), out)
        with open(path) as f:
            found += [{"folder": folder, **json.loads(line)} for line in f if line.strip()]
    return found


__all__ = ["CHANGES_FILE", "Change", "GROWABLE_KEYS", "SAFE_KEYS", "SAFE_SECTIONS", "SAFE_UNLESS", "check_resume",
           "config_changes", "field_defaults", "flatten", "recorded_changes"]
