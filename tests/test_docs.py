"""The documentation's commands, options and Python names exist: every ``myopia ...`` line in a
README/docs code block resolves to a configuration (``--print-config``, no training), every
``--option`` the prose names is an option of some command (or of the launcher/tool it belongs to),
and every ``from myopia... import`` and dotted ``myopia.x.y`` name they show imports (the documented
short paths ``myopia.hf``, ``myopia.generation`` and ``myopia.lora`` included)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from myopia.cli import _commands, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Options of other programs the docs show: torchrun, accelerate, sbatch, pip and the benchmark scripts.
FOREIGN = {"--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--num_processes", "--no-deps",
           "--device", "--compile", "--logdir", "--export", "--signal", "--signals-to-handle", "--shutdown-timeout", "--max-restarts"}


def _code_lines(path: Path) -> list[str]:
    """Logical lines (backslash continuations joined) of the shell code blocks."""
    lines, block, joined = [], None, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            block = None if block is not None else line.strip("` ")
            continue
        if block not in ("bash", "sh", "shell", "console", ""):
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            lines.append(joined.strip())
            joined = ""
    return lines


def _myopia_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line in _code_lines(path):
            line = re.split(r" #| > | \| ", line, maxsplit=1)[0].strip()
            m = re.search(r"(?:^|\s|/)(?:myopia|-m myopia\.cli)\s+(.*)$", line)
            if m and not line.startswith(("pip", "python3 -m venv")):
                args = shlex.split(m.group(1))
                if args and "--help" not in args:
                    found.append((f"{path.name}: {line}", args))
    return found


COMMANDS = _myopia_commands()


def test_docs_show_commands():
    assert len(COMMANDS) >= 10, [c for c, _ in COMMANDS]


@pytest.mark.parametrize("line,args", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_documented_command_resolves(line, args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiment.yaml").write_text("train:\n  steps: 10\n")
    assert main([*args, "--print-config"]) == 0, capsys.readouterr().err
    assert isinstance(yaml.safe_load(capsys.readouterr().out), dict)


def _all_options() -> set[str]:
    options = set()
    for sub in build_parser(_commands())._subparsers._group_actions[0].choices.values():
        options |= {o for a in sub._actions for o in a.option_strings}
    return options


def test_documented_options_exist():
    known = _all_options() | FOREIGN
    named = {o for path in DOCS for o in re.findall(r"--[a-z][a-z0-9_.-]*[a-z0-9_]", path.read_text())}
    assert named - known == set()


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["lm", "--preset", "cpu", "--train.steps", "7", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    assert main(["lm", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    assert yaml.safe_load(text)["train"]["steps"] == 7


def _documented_names() -> list[str]:
    """Every name a ``from myopia... import ...`` line imports, and every dotted ``myopia.x.y`` in
    backticks, in the README and docs."""
    names = set()
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^from (myopia[\w.]*) import ([\w, ]+)", text, re.M):
            names |= {f"{m.group(1)}.{n.strip()}" for n in m.group(2).split(",") if n.strip()}
        for span in re.findall(r"`([^`\n]+)`", text):
            names |= set(re.findall(r"(?<![\w.])(myopia(?:\.\w+)+)", span))
    return sorted(names)


NAMES = _documented_names()


def test_docs_show_python_names():
    assert {"myopia.GPT", "myopia.hf.make_myopic", "myopia.generation.generate_greedy",
            "myopia.lora.apply_lora"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_documented_python_name_imports(name):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for attr in parts[i:]:
        obj = getattr(obj, attr)
    assert obj is not None
