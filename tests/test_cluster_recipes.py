"""The cluster recipes in examples/cluster run here as far as a laptop allows: the SLURM batch script
(with `srun` and `scontrol` stood in by shell stubs) is preempted by USR1 mid-run, requeues itself,
and its rerun resumes to the losses of an uninterrupted run; the plain torchrun script, stopped by
SIGTERM as an orchestrator stops a container, resumes the same way when rerun."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("train --arms myopic --train.steps 30 --train.batch_size 8 --train.log_every 1 --train.eval_batches 2 "
        "--train.progress false --train.device cpu --model.n_embd 16 --model.n_head 2 --data.synthetic.seq_len 8 "
        "--data.synthetic.window 3 --optim.lr 3e-3")

# Loaded by every Python process started with this PYTHONPATH: in torchrun's workers (RANK is set) it
# slows the data a little, so that a signal lands mid-run, and writes the worker's pid.
SITECUSTOMIZE = textwrap.dedent("""
    import os
    if "RANK" in os.environ and os.environ.get("MYOPIA_TEST_PIDS"):
        import time
        from myopia.tasks.synthetic import SyntheticTask
        original = SyntheticTask.train_batch
        def slow(self, *a, **k):
            time.sleep(0.05)
            return original(self, *a, **k)
        SyntheticTask.train_batch = slow
        with open(os.path.join(os.environ["MYOPIA_TEST_PIDS"], "rank" + os.environ["RANK"]), "w") as f:
            f.write(str(os.getpid()))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path, **extra):
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "pids").mkdir(exist_ok=True)
    path = os.pathsep.join([str(tmp_path / "bin"), os.path.dirname(sys.executable), os.environ["PATH"]])
    site = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, "PYTHONPATH": site,
            "MYOPIA_TEST_PIDS": str(tmp_path / "pids"), "NPROC": "2", "PORT": str(_free_port()), **extra}


def _losses(out):
    with open(out / "myopic" / "metrics.jsonl") as f:
        return [json.loads(x)["loss"] for x in f if '"loss"' in x]


def _wait(path, n, job, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None and (
            not path.exists() or len(path.read_text().splitlines()) < n):
        time.sleep(0.05)
    if not (path.exists() and len(path.read_text().splitlines()) >= n):
        job.kill()
        pytest.fail(f"the run did not get going:\n{job.communicate()[0][-3000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", str(_free_port()), "-m", "myopia.cli", *ARGS.split(),
                    "--out", str(out)], check=True, capture_output=True, env=env, timeout=300)
    return _losses(out)


def test_slurm_script_requeues_on_preemption_and_resumes(tmp_path, reference):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun runs its command here (recording torchrun's pid); scontrol names this host and records a requeue.
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho $$ > {tmp_path}/torchrun.pid\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\ncase "$1" in\n  show) echo 127.0.0.1 ;;\n  requeue) echo "$2" >> {tmp_path}/requeued ;;\n'
        'esac\n')
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    out = tmp_path / "run"
    env = _env(tmp_path, OUT=str(out), MYOPIA_ARGS=ARGS, SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="127.0.0.1")
    script = ROOT / "examples" / "cluster" / "slurm.sbatch"
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(out / "myopic" / "metrics.jsonl", 8, job)
    os.kill(int((tmp_path / "torchrun.pid").read_text()), signal.SIGUSR1)  # as SLURM's --signal=USR1@...
    log, _ = job.communicate(timeout=180)
    assert job.returncode == 0, log[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["4242"], log[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == "SIGUSR1"
    reached = results["arms"]["myopic"]["steps"]
    assert 8 <= reached < 30
    # SLURM restarts the requeued job: the same script, which resumes and finishes.
    env["MYOPIA_TEST_PIDS"] = ""  # full speed
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # not requeued again
    assert json.loads((out / "results.json").read_text())["status"] == "completed"
    assert _losses(out) == reference


def test_torchrun_script_stopped_by_sigterm_resumes_when_rerun(tmp_path, reference):
    """Kubernetes (or any orchestrator) sends SIGTERM to the container's main process, torchrun here,
    which forwards it; the orchestrator later reruns the same command, which resumes."""
    out = tmp_path / "run"
    env = _env(tmp_path, OUT=str(out), MAX_RESTARTS="0")
    script = ROOT / "examples" / "cluster" / "torchrun-elastic.sh"
    job = subprocess.Popen(["bash", str(script), *ARGS.split()], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    _wait(out / "myopic" / "metrics.jsonl", 8, job)
    job.send_signal(signal.SIGTERM)  # the script execs torchrun: this is torchrun's pid
    log, _ = job.communicate(timeout=180)
    assert job.returncode != 0, log[-3000:]  # torchrun ends with its SignalException once the workers are done
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == "SIGTERM"
    env["MYOPIA_TEST_PIDS"] = ""
    again = subprocess.run(["bash", str(script), *ARGS.split()], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    assert _losses(out) == reference
