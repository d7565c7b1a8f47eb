"""Configs become the CLI; bad input is a one-line error with a non-zero exit, never a traceback."""

import dataclasses
import os
import subprocess
import sys

import pytest

from myopia import cli
from myopia.config import ConfigError, _dotted_names, field_docs, from_dict
from myopia.experiments.train import TrainExperiment


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "myopia.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for frag in fragments:
        assert frag in err, err


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  lrr: 0.001\n")
    proc = run_cli("train", "--config", str(f), "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "optim.lrr", "did you mean 'lr'")


def test_unknown_option_on_command_line(tmp_path):
    assert_one_line_error(run_cli("train", "--optim.lrr", "0.1"), "--optim.lrr", "--help")


def test_negative_learning_rate(tmp_path):
    proc = run_cli("train", "--optim.lr", "-1e-3", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "lr=-0.001", "positive")
    proc = run_cli("train", "--optim.lr=-2", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "lr=-2.0", "positive")


def test_missing_data_path(tmp_path):
    proc = run_cli("train", "--data.source", "text", "--data.text.corpus", str(tmp_path / "nope.txt"),
                   "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "nope.txt", "does not exist")


def test_wrong_type_and_bad_mode_in_toml(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('[train]\nsteps = "many"\n')
    assert_one_line_error(run_cli("train", "--config", str(f)), "train.steps", "not a valid int")
    assert_one_line_error(run_cli("train", "--arms", "vanilla,sideways"), "sideways")
    assert_one_line_error(run_cli("train", "--config", str(tmp_path / "missing.yaml")), "does not exist")


@pytest.mark.parametrize("option,value,fragment", [
    ("--analysis.first_position_tokens", "-2", "first_position_tokens=-2 must be >= -1"),
    ("--analysis.probe_offsets", "0,1", "probe_offsets=[0, 1] must be positive"),
    ("--analysis.bootstrap", "3", "bootstrap=3 must be >= 10"),
])
def test_bad_analysis_settings(option, value, fragment, capsys):
    assert cli.main(["lm", option, value, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_version(capsys):
    from myopia import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"myopia {__version__}"


def test_help_lists_every_option_with_meaning_and_default():
    from myopia.models.gpt import GPTConfig
    from myopia.tasks.synthetic import SyntheticConfig
    from myopia.tasks.text import TextConfig
    from myopia.train.config import OptimConfig, TrainConfig

    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for name in _dotted_names(TrainExperiment):
        assert f"--{name}" in text, name
    for cls in (TrainExperiment, GPTConfig, OptimConfig, TrainConfig, SyntheticConfig, TextConfig):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
                continue
            assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            assert docs[f.name][:30] in text, f"{cls.__name__}.{f.name}'s meaning is not in --help"
    assert "[float; default: 0.001]" in text  # optim.lr
    assert "[int; default: 300]" in text  # train.steps of the train command


def test_from_dict_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'model.n_layers'"):
        from_dict(TrainExperiment, {"model": {"n_layers": 3}})
    cfg = from_dict(TrainExperiment, {"model": {"n_layer": "3"}, "arms": "vanilla,myopic@0.5"})
    assert cfg.model.n_layer == 3 and cfg.arms == ["vanilla", "myopic@0.5"]


def test_train_end_to_end_on_text(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    out = tmp_path / "run"
    code = cli.main(["train", "--data.source", "text", "--data.text.corpus", str(text), "--data.text.seq_len", "16", "--data.text.tokenizer", "byte",
                     "--train.steps", "5", "--train.batch_size", "4", "--train.progress", "false",
                     "--model.n_embd", "16", "--model.n_head", "2", "--out", str(out)])
    assert code == 0
    import json
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"vanilla", "myopic"}
    assert all(r["status"] == "completed" for r in results["arms"].values())
    assert os.path.isfile(out / "config.yaml")
    # The same --out without --resume refuses to overwrite.
    code = cli.main(["train", "--data.source", "text", "--data.text.corpus", str(text), "--out", str(out),
                     "--train.progress", "false"])
    assert code == 2
