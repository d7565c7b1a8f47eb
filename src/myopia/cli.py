"""The ``myopia`` command line. Every option comes from a typed dataclass config.

    myopia train --help
    myopia train --config experiment.yaml --train.steps 500 --arms vanilla,myopic
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_origin, get_type_hints

import yaml

from myopia.config import (
    ConfigError,
    add_dataclass_arguments,
    field_docs,
    from_dict,
    load_file,
    merge,
    overrides_from_namespace,
    to_dict,
)


@dataclass
class Command:
    name: str
    help: str
    config_cls: type
    run: Callable
    presets: dict | None = None
    default_preset: str | None = None
    positionals: tuple[str, ...] = ()
    """Config fields that may also be given as positional arguments, in this order."""
    preset_for: Callable[[str, dict], dict] | None = None
    """For presets that depend on another option (e.g. the task): the settings of preset NAME given the
    file's and the options' settings."""
    records_attempts: bool = True
    """Whether the command's ``out`` is a run folder that keeps attempts.jsonl (export and eval write
    into folders that must hold only what they produce)."""


def _commands() -> list[Command]:
    from myopia.interop import evaluate, export
    from myopia.experiments import answer, lm, reproduce, sweep, synthetic, train

    return [
        Command("train", "train a GPT in several attention modes (arms) on synthetic data or local text",
                train.TrainExperiment, train.run),
        Command("synthetic", "the paper's synthetic pre-caching experiment (§4): arms, probes, plots, report",
                synthetic.SyntheticExperiment, synthetic.run, synthetic.PRESETS, "cpu"),
        Command("lm", "the natural-language myopia gap (§4.1): arms, bootstrap CIs, per-position gaps, KL, probes",
                lm.LMExperiment, lm.run, lm.PRESETS, "cpu"),
        Command("sweep", "the myopia gap across model sizes (§4.2): one lm run per model, a gap-vs-parameters plot",
                sweep.SweepExperiment, sweep.run, sweep.PRESETS, "cpu"),
        Command("answer", "tasks with answers: multiplication with filler tokens (paper appendix), path-star, parity",
                answer.AnswerExperiment, answer.run, answer.PRESETS, "cpu", preset_for=answer.preset_for),
        Command("reproduce", "laptop-scale reproduction of the paper's headline results, with a report",
                reproduce.ReproduceConfig, reproduce.run),
        Command("export", "write a trained arm as a transformers checkpoint (model, config, tokenizer)",
                export.ExportConfig, export.run, positionals=("arm", "out"), records_attempts=False),
        Command("eval", "zero-shot benchmarks (lm-evaluation-harness) on every arm of runs or on checkpoints",
                evaluate.EvalConfig, evaluate.run, positionals=("paths",), records_attempts=False),
    ]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--optim.lr -1e-3`` reads as an option to argparse; glue such values to their option."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and tok.startswith("-"):
            try:
                float(tok)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={tok}"
                continue
        out.append(tok)
    return out


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    parser = _Parser(prog="myopia", description="Do transformer language models plan ahead? "
                     "Myopic training and the measurements around it.")
    from myopia import __version__

    parser.add_argument("--version", action="version", version=f"myopia {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", metavar="FILE", help="YAML or TOML experiment file (options override it)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration (preset, file and options merged) as YAML and "
                            "exit without running; the output is a valid --config file")
        if cmd.presets:
            p.add_argument("--preset", choices=sorted(cmd.presets), default=cmd.default_preset,
                           help="named settings to start from")
        defaults = from_dict(cmd.config_cls, cmd.presets[cmd.default_preset]) if cmd.presets else None
        for name in cmd.positionals:
            many = get_origin(get_type_hints(cmd.config_cls)[name]) is list
            p.add_argument(name, nargs="*" if many else "?", default=argparse.SUPPRESS, metavar=name.upper(),
                           help=f"{field_docs(cmd.config_cls).get(name, '')} (or --{name})")
        add_dataclass_arguments(p, cmd.config_cls, defaults=defaults)
    return parser


def resolve_config(cmd: Command, ns: argparse.Namespace):
    given: dict = load_file(ns.config) if ns.config else {}
    given = merge(given, overrides_from_namespace(ns, cmd.config_cls))
    data: dict = {}
    if cmd.presets:
        data = cmd.preset_for(ns.preset, given) if cmd.preset_for else cmd.presets[ns.preset]
    data = merge(data, given)
    return from_dict(cmd.config_cls, data, source=ns.config or "options")


def main(argv: list[str] | None = None) -> int:
    from myopia.train.memory import keep_freed_memory

    keep_freed_memory()  # before the first large tensor: CPU steps reuse memory instead of faulting it in
    from myopia.data.corpus import DataError
    from myopia.runs import attempts
    from myopia.runs.results import stage
    from myopia.train.checkpoint import CheckpointError
    from myopia.train.loop import (
        EXIT_PREEMPTED,
        PREEMPTION_SIGNALS,
        NonFiniteLoss,
        Preempted,
        RunDirectoryError,
        forget_stop,
        preemption_handlers,
        stopped_by,
    )

    commands = _commands()
    parser = build_parser(commands)
    ns = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if ns.command is None:
        parser.print_help()
        return 2
    cmd = next(c for c in commands if c.name == ns.command)
    out = None
    code, outcome, error = 2, "failed", None
    try:
        cfg = resolve_config(cmd, ns)
        if ns.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        forget_stop()
        out = getattr(cfg, "out", None) if isinstance(getattr(cfg, "out", None), str) else None
        out = out if cmd.records_attempts else None
        if out:
            attempts.record_start(out, [cmd.name, *(sys.argv[2:] if argv is None else argv[1:])])
        with preemption_handlers():
            result = cmd.run(cfg)
            _wait_for_all_ranks()  # a rank that left early would make torchrun kill rank 0 mid-write
        code, outcome = 0, "completed"
        if _interrupted(result):
            signal_name = stopped_by()
            preempted = signal_name in PREEMPTION_SIGNALS
            code, outcome = (EXIT_PREEMPTED, "preempted") if preempted else (130, "interrupted")
            if os.environ.get("RANK", "0") == "0":
                print(f"myopia {cmd.name}: {'stopped by ' + signal_name if preempted else 'interrupted'}; the "
                      f"checkpoints are saved in {getattr(cfg, 'out', 'the run folder')}: rerun the same command with "
                      f"--resume to continue{f' (exit code {EXIT_PREEMPTED}: requeue)' if preempted else ''}",
                      file=sys.stderr)
        return code
    except Preempted as exc:
        code, outcome = EXIT_PREEMPTED, "preempted"
        if os.environ.get("RANK", "0") == "0":
            print(f"myopia {cmd.name}: stopped by {exc.signal} while {stage()}; finished arms keep their checkpoints "
                  f"in {out or 'the run folder'}: rerun the same command with --resume to continue (exit code "
                  f"{EXIT_PREEMPTED}: requeue)", file=sys.stderr)
        return code
    except (ConfigError, DataError, CheckpointError, RunDirectoryError, NonFiniteLoss) as exc:
        code, error = 2, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"myopia {cmd.name}: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        code, outcome = 130, "interrupted"
        print(f"myopia {cmd.name}: interrupted", file=sys.stderr)
        return code
    except BaseException as exc:  # a crash: recorded, then the traceback as usual
        code, error = 1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise
    finally:
        if out:
            attempts.record_end(out, outcome, code, error=error, stage=stage() if outcome != "completed" else None)
        _teardown_distributed()


def _interrupted(result: object) -> bool:
    """Whether a run's result (or a stage of it, for reproduce) stopped early on Ctrl-C / SIGINT."""
    if not isinstance(result, dict):
        return False
    return result.get("status") == "interrupted" or any(
        isinstance(v, dict) and v.get("status") == "interrupted" for v in result.values())


def _wait_for_all_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _teardown_distributed() -> None:
    """Leave the process group cleanly (gloo aborts the process at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main"]
