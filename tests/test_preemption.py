"""A scheduler's signals (SIGTERM, SIGUSR1) stop a run like Ctrl-C: the step finishes, a checkpoint is
written, the process exits with the documented code, and --resume ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import start_slow_cli

from myopia import cli
from myopia.train import checkpoint as ckpt_mod
from myopia.train.checkpoint import capture, latest_checkpoint, load_checkpoint, save_checkpoint
from myopia.train.loop import EXIT_PREEMPTED, StopSignal, graceful_interrupt

ARGS = ["train", "--arms", "myopic", "--train.steps", "40", "--train.batch_size", "8", "--train.log_every", "1",
        "--train.progress", "false", "--model.n_embd", "16", "--model.n_head", "2", "--data.synthetic.seq_len", "8",
        "--data.synthetic.window", "3"]

def _losses(out):
    with open(out / "myopic" / "metrics.jsonl") as f:
        return [json.loads(x)["loss"] for x in f if '"loss"' in x]


def _wait_for_lines(path, n, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < n):
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(ARGS + ["--out", str(ref)]) == 0
    return _losses(ref)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_exits_75_and_resume_matches(tmp_path, sig, reference):
    out = tmp_path / "preempted"
    proc = start_slow_cli(tmp_path, [*ARGS, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    _wait_for_lines(out / "myopic" / "metrics.jsonl", 10)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert f"stopped by {sig.name}" in last and "--resume" in last and str(out) in last
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == sig.name
    reached = results["arms"]["myopic"]["steps"]
    assert 10 <= reached < 40  # no periodic checkpoints: this one was written on the signal
    assert latest_checkpoint(str(out / "myopic" / "checkpoints")).endswith(f"step_{reached:07d}")
    assert cli.main(ARGS + ["--out", str(out), "--resume"]) == 0
    assert _losses(out) == reference  # to the last bit


def _save_with_a_signal_inside(tmp_path, monkeypatch, second):
    from myopia import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=8, block_size=8))
    opt = torch.optim.AdamW(model.parameters())
    good = save_checkpoint(str(tmp_path), 1, *capture(model, opt), {})
    stop = StopSignal()
    real_save = ckpt_mod.save_file

    def save_then_signal(tensors, path):
        real_save(tensors, path)
        os.kill(os.getpid(), second)  # a second signal, mid-save
        time.sleep(0.1)

    with graceful_interrupt(stop):
        os.kill(os.getpid(), signal.SIGTERM)  # the first: save and stop
        assert stop.requested and stop.preempted
        monkeypatch.setattr(ckpt_mod, "save_file", save_then_signal)
        try:
            return good, model, opt, save_checkpoint(str(tmp_path), 2, *capture(model, opt), {})
        finally:
            monkeypatch.setattr(ckpt_mod, "save_file", real_save)


def test_ctrl_c_during_the_save_abandons_it_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        _save_with_a_signal_inside(tmp_path, monkeypatch, signal.SIGINT)
    assert latest_checkpoint(str(tmp_path)).endswith("step_0000001")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000001"]  # the half-written one is gone
    from myopia import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=8, block_size=8))
    load_checkpoint(latest_checkpoint(str(tmp_path)), model, torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGUSR1])
def test_a_repeated_scheduler_signal_during_the_save_lets_it_finish(tmp_path, monkeypatch, second):
    good, model, opt, path = _save_with_a_signal_inside(tmp_path, monkeypatch, second)
    assert latest_checkpoint(str(tmp_path)) == path and path.endswith("step_0000002")
    load_checkpoint(path, model, opt)


TINY = ["train", "--arms", "vanilla", "--train.steps", "4", "--train.batch_size", "4", "--train.checkpoint_every", "2",
        "--train.progress", "false", "--model.n_embd", "16", "--model.n_head", "2", "--data.synthetic.seq_len", "8",
        "--data.synthetic.window", "3"]


def _rewind(out, step):
    import shutil

    ckpts = out / "vanilla" / "checkpoints"
    for name in os.listdir(ckpts):
        if name.startswith("step_") and int(name.split("_")[1]) > step:
            shutil.rmtree(ckpts / name)
    (ckpts / "latest").write_text(f"step_{step:07d}\n")


def test_resume_with_a_changed_recipe_is_refused_naming_each_key(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(TINY + ["--out", str(out)]) == 0
    _rewind(out, 2)
    capsys.readouterr()
    code = cli.main(TINY + ["--out", str(out), "--resume", "--optim.lr", "5e-3", "--optim.beta2", "0.95"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "optim.lr 0.001 -> 0.005" in err and "optim.beta2 0.999 -> 0.95" in err
    assert "--train.allow_changes optim.beta2,optim.lr" in err
    assert not (out / "config_changes.jsonl").exists()
    # Safe keys (logging, cadence, progress) pass without a word.
    assert cli.main(TINY + ["--out", str(out), "--resume", "--train.log_every", "1", "--train.checkpoint_every", "1"]) == 0
    assert not (out / "config_changes.jsonl").exists()


def test_an_allowed_change_is_recorded_with_the_step(tmp_path):
    out = tmp_path / "r"
    assert cli.main(TINY + ["--out", str(out)]) == 0
    _rewind(out, 2)
    assert cli.main(TINY + ["--out", str(out), "--resume", "--optim.lr", "5e-3", "--train.allow_changes", "optim.lr"]) == 0
    record = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert record == [{"key": "optim.lr", "old": 0.001, "new": 0.005, "steps": {"vanilla": 2}}]
    results = json.loads((out / "results.json").read_text())
    assert results["config_changes"] == [{"folder": ".", **record[0]}]
    with open(out / "vanilla" / "metrics.jsonl") as f:
        lrs = [json.loads(x)["lr"] for x in f if '"lr"' in x]
    from myopia.train.config import OptimConfig
    from myopia.train.optim import lr_at

    assert lrs[-1] == pytest.approx(lr_at(3, 4, OptimConfig(lr=5e-3)))  # the new lr took effect after the resume


def test_drift_rules():
    from myopia.runs.drift import config_changes

    old = {"seeds": [0, 1], "arms": ["vanilla", "myopic"], "optim": {"lr": 1e-3}, "train": {"steps": 10, "log_every": 5}}
    grown = {**old, "seeds": [0, 1, 2], "train": {"steps": 10, "log_every": 1}}
    assert config_changes(old, grown) == []  # new seeds are new runs; logging cadence is safe
    keys = [c.key for c in config_changes(old, {**old, "seeds": [1, 2], "train": {"steps": 20, "log_every": 5}})]
    assert keys == ["seeds", "train.steps"]  # dropping a seed, extending the cosine schedule
    lens = {**old, "future_lens": {"enabled": False, "seeds": []}}  # measured after training: never a change
    assert config_changes(lens, {**old, "future_lens": {"enabled": True, "seeds": [0, 1]}}) == []


def test_a_setting_added_since_the_run_started_passes_at_its_default():
    """A run recorded before a setting existed resumes under a myopia that has it, at its default
    (which keeps the old behaviour); any other value of it is a change like any other."""
    from myopia.experiments.lm.config import LMExperiment
    from myopia.runs.drift import config_changes, field_defaults

    defaults = field_defaults(LMExperiment)
    assert defaults["analysis.gradient_split_groups"] == 1 and defaults["optim.lr"] == LMExperiment().optim.lr
    new = {"optim": {"lr": 1e-3}, "analysis": {"gradient_split_batches": 2, "gradient_split_groups": 1}}
    old = {"optim": {"lr": 1e-3}, "analysis": {"gradient_split_batches": 2}}
    assert config_changes(old, new, defaults) == []
    assert [c.key for c in config_changes(old, new)] == ["analysis.gradient_split_groups"]  # no defaults known
    changed = {**new, "analysis": {"gradient_split_batches": 2, "gradient_split_groups": 2}}
    assert [str(c) for c in config_changes(old, changed, defaults)] == ["analysis.gradient_split_groups '<absent>' -> 2"]


def test_sigterm_during_myopia_lm_saves_and_resume_ends_as_an_uninterrupted_run(tmp_path):
    from conftest import write_word_corpus

    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    args = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic", "--train.steps", "60",
            "--train.log_every", "1"]
    ref = tmp_path / "ref"
    assert cli.main(args + ["--out", str(ref)]) == 0
    out = tmp_path / "preempted"
    proc = start_slow_cli(tmp_path, [*args, "--out", str(out)], task="myopia.tasks.text:TextTask",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out / "seed0" / "myopic" / "metrics.jsonl", 10)  # the second arm, mid-run
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == "SIGTERM"
    ckpt = latest_checkpoint(str(out / "seed0" / "myopic" / "checkpoints"))
    assert ckpt is not None and 0 < int(ckpt.rsplit("_", 1)[1]) < 60
    assert cli.main(args + ["--out", str(out), "--resume"]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert b["status"] == "completed"
    for arm in ("vanilla", "myopic"):
        with open(ref / "seed0" / arm / "metrics.jsonl") as f, open(out / "seed0" / arm / "metrics.jsonl") as g:
            assert [json.loads(x).get("loss") for x in f] == [json.loads(x).get("loss") for x in g]
    assert b["comparisons"]["myopic vs vanilla"]["gap"] == a["comparisons"]["myopic vs vanilla"]["gap"]
