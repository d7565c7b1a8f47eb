"""The shared training loop: exact resume, Ctrl-C, non-finite losses, atomic checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from myopia.attention import Cut
from myopia.models.gpt import GPTConfig
from myopia.runs.arms import Arm, build_model
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask
from myopia.train.checkpoint import (
    CheckpointError,
    capture,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.loop import NonFiniteLoss, RunDirectoryError, StopSignal, train_arm

MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.1, activation="relu")
OPTIM = OptimConfig(lr=3e-3, warmup=0.2)


def setup(seed=0):
    task = SyntheticTask(SyntheticConfig(seq_len=16, window=4), seed=0)
    model = build_model(MODEL, Arm("myopic", Cut("myopic")), task.model_overrides(), seed)
    return task, model


def cfg(**kw):
    base = dict(steps=12, batch_size=8, log_every=1, checkpoint_every=4, eval_batches=2, progress=False)
    return TrainConfig(**{**base, **kw})


def losses(result):
    return [r["loss"] for r in result.history if "loss" in r]


def test_resume_continues_exactly(tmp_path):
    task, full_model = setup()
    full = train_arm(full_model, task, OPTIM, cfg(), str(tmp_path / "full"), "myopic")
    assert full.status == "completed" and len(losses(full)) == 12

    stop = StopSignal()
    task, model = setup()
    part = train_arm(model, task, OPTIM, cfg(), str(tmp_path / "part"), "myopic", stop=stop,
                     on_step=lambda step, rec: stop.request() if step == 6 else None)
    assert part.status == "interrupted" and part.steps == 6
    # A fresh process would start from a differently initialised model: resuming must overwrite it all.
    task, model = setup(seed=123)
    resumed = train_arm(model, task, OPTIM, cfg(), str(tmp_path / "part"), "myopic", resume=True)
    assert resumed.status == "completed"
    assert losses(resumed) == losses(full)
    assert resumed.eval["loss"] == full.eval["loss"]
    for (name, a), b in zip(model.state_dict().items(), full_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_from_step_0_writes_the_start_records_once(tmp_path):
    """Stopped before its first step (the checkpoint at step 0 follows the start's evaluation and
    monitor), a resumed arm neither evaluates the start again nor writes its records twice."""
    calls = []

    def monitor(model, step, optimizer):
        calls.append(step)
        return {"watched": step}

    def records(arm_dir):
        with open(os.path.join(arm_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    task, model = setup()
    full = train_arm(model, task, OPTIM, cfg(steps=3, eval_every=2, eval_on_start=True), str(tmp_path / "full"), "myopic",
                     monitor=monitor)
    stop = StopSignal()
    stop.request()
    task, model = setup()
    part = train_arm(model, task, OPTIM, cfg(steps=3, eval_every=2, eval_on_start=True), str(tmp_path / "part"), "myopic", stop=stop,
                     monitor=monitor)
    assert part.status == "interrupted" and part.steps == 0
    task, model = setup()
    resumed = train_arm(model, task, OPTIM, cfg(steps=3, eval_every=2, eval_on_start=True), str(tmp_path / "part"), "myopic",
                        resume=True, monitor=monitor)
    assert resumed.status == "completed" and calls == [0, 1, 2, 3] + [0, 1, 2, 3]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rs]  # noqa: E731
    assert strip(records(str(tmp_path / "part"))) == strip(records(str(tmp_path / "full")))
    assert [r["step"] for r in records(str(tmp_path / "part")) if "eval_loss" in r] == [0, 2, 3]


def test_restore_hands_the_optimiser_the_loaded_moments(tmp_path):
    """A resume restores AdamW's moments as the loaded tensors themselves, with every value as saved,
    and makes no state of its own first (torch's state-dict API would take a zero-gradient step to
    make one: a second copy of the moments at the resume's peak)."""
    from myopia import GPT
    from myopia.train.checkpoint import read_checkpoint, restore

    def model_and_optimizer():
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=16, block_size=8))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    model, opt = model_and_optimizer()
    model(torch.randint(0, 32, (2, 8))).float().mean().backward()
    opt.step()
    path = save_checkpoint(str(tmp_path), 1, *capture(model, opt), {})
    weights, optim_state, _, _ = read_checkpoint(path)
    loaded = {name: values["exp_avg"].data_ptr() for name, values in optim_state["state"].items()}
    fresh, fresh_opt = model_and_optimizer()
    steps = []
    step = fresh_opt.step
    fresh_opt.step = lambda *a, **k: steps.append(1) or step(*a, **k)
    restore(fresh, fresh_opt, weights, optim_state)
    assert steps == []
    names = {p: n for n, p in fresh.named_parameters()}
    assert {names[p]: v["exp_avg"].data_ptr() for p, v in fresh_opt.state.items()} == loaded
    saved = {n: opt.state[p] for n, p in model.named_parameters()}
    for p, values in fresh_opt.state.items():
        assert all(torch.equal(values[k], saved[names[p]][k]) for k in values), names[p]


def test_kill_loses_only_steps_since_last_checkpoint(tmp_path):
    task, model = setup()
    full = train_arm(model, task, OPTIM, cfg(), str(tmp_path / "full"), "myopic")
    stop = StopSignal()
    task, model = setup()
    train_arm(model, task, OPTIM, cfg(), str(tmp_path / "kill"), "myopic", stop=stop,
              on_step=lambda step, rec: stop.request() if step == 7 else None)
    ckpts = tmp_path / "kill" / "checkpoints"
    # Simulate a kill at step 7: the stop-time checkpoint never got written, the step-4 one did.
    shutil.rmtree(ckpts / "step_0000007")
    (ckpts / "latest").write_text("step_0000004\n")
    task, model = setup(seed=5)
    resumed = train_arm(model, task, OPTIM, cfg(), str(tmp_path / "kill"), "myopic", resume=True)
    assert losses(resumed) == losses(full)


def test_existing_run_needs_resume(tmp_path):
    task, model = setup()
    train_arm(model, task, OPTIM, cfg(steps=2), str(tmp_path / "r"), "myopic")
    with pytest.raises(RunDirectoryError, match="--resume"):
        train_arm(model, task, OPTIM, cfg(steps=2), str(tmp_path / "r"), "myopic")


def test_non_finite_loss_names_step_arm_and_checkpoint(tmp_path):
    task, model = setup()
    original = task.train_batch

    def poisoned(step, micro, batch_size):
        x, y = original(step, micro, batch_size)
        return (x, y * float("nan")) if step == 5 else (x, y)

    task.train_batch = poisoned
    with pytest.raises(NonFiniteLoss) as info:
        train_arm(model, task, OPTIM, cfg(), str(tmp_path / "nan"), "myopic")
    msg = str(info.value)
    assert "step 5" in msg and "'myopic'" in msg and "step_0000004" in msg


def test_checkpoint_round_trip_and_corruption(tmp_path):
    task, model = setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = task.train_batch(0, 0, 4)
    task.loss_per_position(model(x), y).mean().backward()
    opt.step()
    path = save_checkpoint(str(tmp_path / "c"), 1, *capture(model, opt), {"note": "x"})
    _, other = setup(seed=9)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    state = load_checkpoint(path, other, opt2)
    assert state["step"] == 1 and state["note"] == "x"
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    # A torn (truncated) weights file is detected and named.
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, other, opt2)
    # A half-written checkpoint folder (no manifest) is never chosen as the latest.
    os.makedirs(tmp_path / "c" / ".step_0000002.tmp-1")
    assert latest_checkpoint(str(tmp_path / "c"), verified=False).endswith("step_0000001")
    # ... and a damaged one is skipped when checksums are verified (here: nothing intact is left).
    assert latest_checkpoint(str(tmp_path / "c"), log=lambda m: None) is None


def test_checkpoint_files_are_not_pickles(tmp_path):
    task, model = setup()
    path = save_checkpoint(str(tmp_path / "c"), 3, *capture(model, torch.optim.AdamW(model.parameters())), {})
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            head = f.read(2)
        assert head != b"\x80\x04" and head[:1] != b"\x80", f"{name} looks like a pickle"


def test_ctrl_c_saves_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "myopia.cli", "train", "--out", str(out), "--arms", "myopic",
            "--train.steps", "3000", "--train.batch_size", "8", "--train.log_every", "1",
            "--model.n_embd", "16", "--model.n_head", "2", "--data.synthetic.seq_len", "8",
            "--data.synthetic.window", "3", "--train.progress", "false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "myopic" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr  # saved, but not completed: scripts must not carry on
    assert "stopped at step" in stdout + stderr and "--resume" in stderr.splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    stopped = results["arms"]["myopic"]["steps"]
    assert 0 < stopped < 3000
    assert latest_checkpoint(str(out / "myopic" / "checkpoints")).endswith(f"step_{stopped:07d}")


def test_bf16_autocast_on_a_cpu_without_native_bf16_warns_once(monkeypatch):
    """Emulated bf16 (no AMX / AVX512-BF16) is several times slower than float32: say so, once."""
    import warnings

    from myopia.train import precision

    monkeypatch.setenv("MYOPIA_NATIVE_BF16", "0")
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="--train.precision fp32"):
        with precision.autocast_for(cpu, "bf16"):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with precision.autocast_for(cpu, "bf16"):  # once per process
            pass
        with precision.autocast_for(cpu, "auto"):  # float32 on such a CPU: nothing to say
            assert not torch.is_autocast_enabled("cpu")
