"""The documentation's commands and options exist: every ``myopia ...`` line in a README/docs code
block resolves to a configuration (``--print-config``, no training), and every ``--option`` the
prose names is an option of some command (or of the launcher/tool it belongs to)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from myopia.cli import _commands, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Options of other programs the docs show: torchrun, accelerate, pip and the benchmark scripts.
FOREIGN = {"--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--num_processes", "--no-deps",
           "--device", "--compile", "--logdir"}


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
