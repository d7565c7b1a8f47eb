"""No lost runs, no silent restarts (issue 41): damaged checkpoints stop a --resume instead of
restarting it, a re-save never leaves no loadable checkpoint, stale folders go, consolidation keeps
`latest`, a refused run leaves its recorded recipe alone, precision-changing moves are drift, a
signal outside the training loop exits 75 with the stage recorded (and a resume redoes only what was
not finished), every attempt records how it ended, every rank keeps its own generator state, and the
stop decision rides the loss's all-reduce."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import start_slow_cli, write_word_corpus

from myopia import cli
from myopia.runs import attempts
from myopia.train import checkpoint as ck
from myopia.train.loop import EXIT_PREEMPTED

ARGS = ["train", "--arms", "myopic", "--train.steps", "12", "--train.batch_size", "8", "--train.log_every", "1",
        "--train.progress", "false", "--model.n_embd", "16", "--model.n_head", "2", "--data.synthetic.seq_len", "8",
        "--data.synthetic.window", "3", "--train.keep_checkpoints", "1", "--train.checkpoint_every", "4"]


def _state(n=3):
    torch.manual_seed(n)
    return {"w": torch.randn(4, 3)}


def _save(ckpt_dir, step, keep=1, **kw):
    return ck.save_checkpoint(str(ckpt_dir), step, _state(step), None, {"arm": "a"}, keep=keep, **kw)


# Item 1: damaged checkpoints never restart a run silently.

def test_resume_with_only_damaged_checkpoints_stops_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--out", str(out)]) == 0
    ckpts = out / "myopic" / "checkpoints"
    latest = ck.latest_checkpoint(str(ckpts))
    with open(os.path.join(latest, "model.safetensors"), "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    metrics = (out / "myopic" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(ARGS + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "--train.discard_damaged" in err[0] and "--out" in err[0]
    assert (out / "myopic" / "metrics.jsonl").read_bytes() == metrics  # untouched
    assert os.path.isdir(latest)
    # The explicit way on: the damaged folder and its metrics are moved aside, the arm trains from step 0.
    assert cli.main(ARGS + ["--out", str(out), "--resume", "--train.discard_damaged", "true"]) == 0
    aside = [n for n in os.listdir(out / "myopic") if n.startswith("checkpoints.damaged-")]
    assert len(aside) == 1 and (out / "myopic" / aside[0] / "metrics.jsonl").read_bytes() == metrics
    rows = [json.loads(x) for x in (out / "myopic" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and max(r["step"] for r in rows) == 12


def test_without_resume_a_damaged_run_is_still_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--out", str(out), "--train.steps", "4"]) == 0
    latest = ck.latest_checkpoint(str(out / "myopic" / "checkpoints"))
    os.remove(os.path.join(latest, ck.MANIFEST))
    assert cli.main(ARGS + ["--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_kill_between_the_renames_of_a_resave_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    ckpts = tmp_path / "ckpt"
    _save(ckpts, 5)
    real = os.replace
    calls = []

    def killed_after_first(src, dst):  # the process dies between moving step_5 aside and moving the new one in
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        ck._commit(_tmp_copy(ckpts, 5), str(ckpts / "step_0000005"))
    monkeypatch.setattr(ck.os, "replace", real)
    assert not (ckpts / "step_0000005").exists()  # the moment the old code had no checkpoint at all
    found = ck.latest_checkpoint(str(ckpts))
    assert found is not None and ck.checkpoint_step(found) == 5
    weights, _, state, _ = ck.read_checkpoint(found)
    assert torch.equal(weights["w"], _state(5)["w"]) and state["step"] == 5
    assert ck.damage_report(str(ckpts)) is None


def _tmp_copy(ckpts, step):
    """A complete, not yet committed save of ``step`` (what save_checkpoint builds before _commit)."""
    import shutil

    tmp = ckpts / f".step_{step:07d}.tmp-999"
    shutil.copytree(ckpts / f"step_{step:07d}", tmp)
    os.remove(tmp / ck.MANIFEST)
    return str(tmp)


def test_only_an_incomplete_save_left_is_damage_not_a_fresh_start(tmp_path):
    ckpts = tmp_path / "ckpt"
    (ckpts / ".step_0000004.tmp-123").mkdir(parents=True)  # killed while writing: no manifest
    (ckpts / ".step_0000004.tmp-123" / "model.safetensors").write_bytes(b"half")
    assert ck.latest_checkpoint(str(ckpts)) is None
    assert ck.damage_report(str(ckpts)) is not None


def test_stale_folders_are_removed_on_the_next_save(tmp_path):
    ckpts = tmp_path / "ckpt"
    _save(ckpts, 3)
    (ckpts / ".step_0000004.tmp-123").mkdir()
    (ckpts / ".step_0000003.old-77").mkdir()
    _save(ckpts, 6)
    assert sorted(os.listdir(ckpts)) == ["latest", "step_0000006"]


# Item 3: consolidating an older step leaves `latest` where it was.

def test_consolidate_of_an_older_step_keeps_latest(tmp_path):
    from myopia.train.distributed import Dist

    ckpts = tmp_path / "ckpt"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    older = ck.save_sharded_checkpoint(str(ckpts), 2, model, opt, {"arm": "a"}, Dist(), keep=5)
    newer = _save(ckpts, 4, keep=5)
    assert ck.latest_checkpoint(str(ckpts)) == newer
    ck.consolidate(older)
    assert not ck.is_sharded(older)
    assert ck.latest_checkpoint(str(ckpts)) == newer
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    # consolidating the latest step itself keeps pointing at it
    latest_sharded = ck.save_sharded_checkpoint(str(ckpts), 6, model, opt, {"arm": "a"}, Dist(), keep=5)
    ck.consolidate(latest_sharded)
    assert ck.latest_checkpoint(str(ckpts)) == latest_sharded


# Item 4: drift is checked against the recorded recipe; precision-changing moves are drift.

def test_a_refused_run_leaves_its_recorded_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--out", str(out), "--train.steps", "4"]) == 0
    recorded = (out / "config.yaml").read_text()
    assert cli.main(ARGS + ["--out", str(out), "--train.steps", "4", "--optim.lr", "0.05"]) == 2  # no --resume
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == recorded
    assert cli.main(ARGS + ["--out", str(out), "--train.steps", "4", "--optim.lr", "0.05", "--resume"]) == 2
    assert "optim.lr" in capsys.readouterr().err  # the change is still caught


def test_device_is_not_a_safe_change_under_precision_auto():
    from myopia.runs.drift import config_changes

    old = {"train": {"device": "cpu", "precision": "auto"}}
    assert [c.key for c in config_changes(old, {"train": {"device": "cuda", "precision": "auto"}})] == ["train.device"]
    fixed = {"train": {"device": "cpu", "precision": "fp32"}}
    assert config_changes(fixed, {"train": {"device": "cuda", "precision": "fp32"}}) == []


def test_resume_on_a_machine_where_auto_means_another_precision_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("MYOPIA_NATIVE_BF16", "1")
    assert cli.main(ARGS + ["--out", str(out), "--train.steps", "8"]) == 0
    monkeypatch.setenv("MYOPIA_NATIVE_BF16", "0")  # a CPU without bf16 units: auto is float32 there
    assert cli.main(ARGS + ["--out", str(out), "--train.steps", "8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "bf16" in err and "fp32" in err and "--train.precision bf16" in err


# Item 5 and 2: a signal outside the training loop; every attempt records how it ended.

def test_sigterm_while_scoring_exits_75_records_the_stage_and_resumes_without_rescoring(tmp_path):
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    args = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic", "--train.steps", "6",
            "--analysis.heldout_windows", "0"]
    out = tmp_path / "run"
    marker = tmp_path / "scoring"
    script = tmp_path / "slow_scoring.py"
    script.write_text(
        "import sys, time\n"
        "from myopia.experiments.lm import analysis, single\n"
        "original = analysis.score_model\n"
        "def slow(*a, **k):\n"
        f"    open({str(marker)!r}, 'a').write(a[2] + '\\n')\n"
        "    time.sleep(30)\n"
        "    return original(*a, **k)\n"
        "single.score_model = slow\n"
        "from myopia.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "MYOPIA_ATTEMPT": "job.0"}
    proc = subprocess.Popen([os.sys.executable, str(script), *args, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "stopped by SIGTERM while scoring" in stderr.strip().splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == "SIGTERM"
    assert results["stopped_in"].startswith("scoring")
    assert attempts.outcome(str(out), "job.0") == "preempted"
    # The resume scores what was not scored and trains nothing again.
    before = (out / "seed0" / "vanilla" / "metrics.jsonl").read_text()
    os.environ["MYOPIA_ATTEMPT"] = "job.1"
    try:
        assert cli.main(args + ["--out", str(out), "--resume"]) == 0
    finally:
        del os.environ["MYOPIA_ATTEMPT"]
    assert (out / "seed0" / "vanilla" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    assert attempts.outcome(str(out), "job.1") == "completed"
    assert (out / "seed0" / "vanilla" / "scores.npz").exists()


def test_scores_are_read_back_instead_of_scored_again(tmp_path, monkeypatch):
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    args = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic", "--train.steps", "4"]
    out = tmp_path / "run"
    assert cli.main(args + ["--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    from myopia.experiments.lm import single

    def never(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(single, "score_model", never)
    assert cli.main(args + ["--out", str(out), "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["comparisons"]["myopic vs vanilla"]["gap"] == first["comparisons"]["myopic vs vanilla"]["gap"]


def test_a_failed_attempt_is_recorded_with_its_error(tmp_path, monkeypatch):
    from myopia.train import loop

    out = tmp_path / "run"
    monkeypatch.setenv("MYOPIA_ATTEMPT", "job.7")

    def broken(*a, **k):
        raise loop.NonFiniteLoss("arm 'myopic': loss became nan at step 3")

    monkeypatch.setattr("myopia.runs.runner.train_arm", broken)
    assert cli.main(ARGS + ["--out", str(out)]) == 2
    records = attempts.read(str(out))
    assert [r["event"] for r in records] == ["started", "ended"]
    assert records[1]["outcome"] == "failed" and "loss became nan" in records[1]["error"]
    assert attempts.outcome(str(out), "job.7") == "failed"
    assert attempts.main([str(out), "job.7"]) == 1  # a job script would not requeue it
    assert attempts.main([str(out), "job.8"]) == 1  # nor an attempt that left no record


def test_slurm_script_does_not_requeue_a_crash_after_a_preemption(tmp_path):
    """The loop the review found: one preemption, then a crash. The first attempt is requeued; the
    second, which crashes, is not (the old script read the first attempt's results.json)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "run"
    # srun stands in for the whole torchrun job: attempt 0 records a preemption, attempt 1 crashes.
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f"if [ \"$SLURM_RESTART_COUNT\" = 0 ]; then\n"
        f"  {os.sys.executable} -c \"from myopia.runs import attempts as a; a.record_start('{out}', []); "
        f"a.record_end('{out}', 'preempted', 75)\"\n  exit 1\nfi\n"
        f"{os.sys.executable} -c \"from myopia.runs import attempts as a; a.record_start('{out}', [])\"\n"
        "exit 1\n")
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\ncase "$1" in\n  show) echo 127.0.0.1 ;;\n  requeue) echo "$2" >> {tmp_path}/requeued ;;\nesac\n')
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    (tmp_path / "results.json").write_text("{}")
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(os.sys.executable), os.environ["PATH"]]),
           "OUT": str(out), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "127.0.0.1"}
    script = os.path.join(root, "examples", "cluster", "slurm.sbatch")
    first = subprocess.run(["bash", script], env={**env, "SLURM_RESTART_COUNT": "0"}, capture_output=True, text=True)
    assert first.returncode == 0 and (tmp_path / "requeued").read_text().split() == ["4242"], first.stdout
    # results.json of attempt 0 says "interrupted by SIGUSR1" (what the old script read); attempt 1 crashed
    (out / "results.json").write_text(json.dumps({"status": "interrupted", "stopped_by": "SIGUSR1"}))
    second = subprocess.run(["bash", script], env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True)
    assert second.returncode != 0 and "not requeueing" in second.stdout
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # not requeued again
    # and a run preempted MAX_REQUEUES times stops requeueing
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f"{os.sys.executable} -c \"from myopia.runs import attempts as a; a.record_end('{out}', 'preempted', 75)\"\n"
        "exit 1\n")
    capped = subprocess.run(["bash", script], env={**env, "SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"},
                            capture_output=True, text=True)
    assert capped.returncode == 75 and "requeued 3 times" in capped.stdout
    assert (tmp_path / "requeued").read_text().split() == ["4242"]


def test_torchrun_script_exit_code_tells_preemption_from_failure(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "run"
    script = os.path.join(root, "examples", "cluster", "torchrun-elastic.sh")
    for outcome, code in (("preempted", 75), ("failed", 1), ("completed", 0)):
        record = (f"a.record_start('{out}', []); a.record_end('{out}', '{outcome}', 0)" if outcome != "failed" else
                  f"a.record_start('{out}', [])")
        (bin_dir / "torchrun").write_text(
            f"#!/bin/bash\n{os.sys.executable} -c \"from myopia.runs import attempts as a; {record}\"\n"
            f"exit {0 if outcome == 'completed' else 1}\n")
        (bin_dir / "torchrun").chmod(0o755)
        env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(os.sys.executable),
                                                       os.environ["PATH"]]),
               "OUT": str(out), "MYOPIA_ATTEMPT": f"k8s-{outcome}"}
        done = subprocess.run(["bash", script, "train"], env=env, capture_output=True, text=True)
        assert done.returncode == code, (outcome, done.stdout, done.stderr)


# Item 6: every rank's generator state; the stop flag rides the loss's all-reduce.

class _TwoRanks:
    enabled, world = True, 2

    def __init__(self, rank):
        self.rank = rank

    def all_objects(self, obj):
        other = {k: v.clone() for k, v in obj.items()}
        other["rng/cpu"] = torch.Generator().manual_seed(99).get_state()
        return [obj, other] if self.rank == 0 else [other, obj]


def test_every_rank_restores_its_own_generator_state():
    torch.manual_seed(5)
    saved = ck.gather_rng(_TwoRanks(0))
    assert {"rng/cpu", "rng/rank0/cpu", "rng/rank1/cpu"} <= set(saved)
    assert not torch.equal(saved["rng/rank0/cpu"], saved["rng/rank1/cpu"])
    assert torch.equal(ck.rng_for_rank(saved, 1, 2)["rng/cpu"], saved["rng/rank1/cpu"])
    assert torch.equal(ck.rng_for_rank(saved, 0, 2)["rng/cpu"], saved["rng/rank0/cpu"])
    assert torch.equal(ck.rng_for_rank(saved, 1, 3)["rng/cpu"], saved["rng/cpu"])  # another world size: rank 0's
    assert torch.equal(ck.rng_for_rank({"rng/cpu": saved["rng/cpu"]}, 1, 2)["rng/cpu"], saved["rng/cpu"])  # old files


def test_the_stop_flag_rides_the_loss_all_reduce(tmp_path, monkeypatch):
    """One all-reduce per step from the loop (the loss's), where the loop used to make two."""
    import torch.distributed as torch_dist

    from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask
    from myopia.train import loop
    from myopia.train.config import OptimConfig, TrainConfig
    from myopia.train.distributed import Dist

    calls = []

    def all_reduce(t, op=None):
        calls.append(tuple(t.shape))

    monkeypatch.setattr(torch_dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch_dist, "get_backend", lambda: "gloo")
    dist = Dist(rank=0, world=2)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj: obj)
    monkeypatch.setattr(dist, "all_objects", lambda obj: [obj, obj])
    monkeypatch.setattr(dist, "shard", lambda t: t)
    monkeypatch.setattr(loop, "parallelize", lambda model, *a: model)
    from myopia import GPT, GPTConfig

    task = SyntheticTask(SyntheticConfig(seq_len=8, window=3), seed=0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, **task.model_overrides()))
    cfg = TrainConfig(steps=5, batch_size=4, eval_batches=1, progress=False, device="cpu", log_every=1,
                      checkpoint_every=0, precision="fp32")
    loop.train_arm(model, task, OptimConfig(), cfg, str(tmp_path / "a"), "a", dist=dist)
    assert len([c for c in calls if c == (2,)]) == 5  # the loss and the stop flag together, once a step
    assert [c for c in calls if c in ((), (1,))] == []  # no separate loss mean or stop flag
