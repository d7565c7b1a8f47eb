"""torchrun on CPU (gloo): 2 processes give the same losses as 1 at the same global batch, for DDP and
FSDP2, and checkpoints move between world sizes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

COMMON = ["train", "--arms", "myopic", "--train.steps", "8", "--train.batch_size", "8", "--train.grad_accum", "2",
          "--train.log_every", "1", "--train.checkpoint_every", "4", "--train.eval_batches", "2",
          "--train.progress", "false", "--train.device", "cpu", "--model.n_embd", "16", "--model.n_head", "2",
          "--data.synthetic.seq_len", "8", "--data.synthetic.window", "3", "--optim.lr", "3e-3",
          "--train.precision", "fp32"]  # world sizes compared to 1e-5: float32 on every CPU (bf16 rounds per shard)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out, nproc, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "myopia.cli"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "myopia.cli"]
    proc = subprocess.run(cmd + COMMON + ["--out", str(out), *extra], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out):
    with open(os.path.join(out, "myopic", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    launch(out, 1)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, strategy):
    out = tmp_path / strategy
    launch(out, 2, "--train.parallel", strategy)
    (a, ea), (b, eb) = losses(single), losses(out)
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert eb == pytest.approx(ea, rel=1e-5, abs=1e-6)


def _rewind_to_step4(out):
    ckpts = os.path.join(out, "myopic", "checkpoints")
    shutil.rmtree(os.path.join(ckpts, "step_0000008"))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step_0000004\n")


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_checkpoint_moves_between_world_sizes(single, tmp_path, first, second):
    out = tmp_path / "run"
    launch(out, first)
    _rewind_to_step4(out)
    launch(out, second, "--resume")
    a, _ = losses(single)
    b, _ = losses(out)
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_gradient_split_under_ddp_matches_one_process(tmp_path):
    """The gradient-split monitor runs on the bare model in every process (no DDP all-reduce, no
    effect on training): 2 processes log the same losses and the same split as 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "myopia.cli", "synthetic", "--preset", "tiny", "--train.device", "cpu", "--arms", "myopic",
            "--control_arms", "", "--train.steps", "9", "--probe.train_sequences", "64", "--probe.test_sequences", "64",
            "--train.precision", "fp32"]
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                                          "127.0.0.1", "--master-port", str(_free_port())]
        proc = subprocess.run([sys.executable, *launcher, *args, "--out", str(out)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out / "seed0" / "shift1_p1" / "myopic" / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        runs[nproc] = ([r["loss"] for r in rows if "loss" in r],
                       [(r["step"], r["gradient_split"]) for r in rows if "gradient_split" in r])
    assert [s for s, _ in runs[1][1]] == [0, 1, 2, 4, 8, 9]
    assert runs[1][0] == pytest.approx(runs[2][0], rel=1e-5)
    # At step 0 (the same weights) the split is the same computation in every process. Later, the
    # weights it is measured at differ between 1 and 2 processes by the all-reduce's summation order,
    # which moves the gradient norms by up to ~8e-5 of the total norm (measured), and the future part,
    # a difference of two nearly equal gradients, by 3e-4 of itself: compare every part relative to
    # the total gradient's norm. A monitor that all-reduced or saw a shard would be off by O(1).
    for (step, one), (_, two) in zip(runs[1][1], runs[2][1]):
        tol = 1e-6 if step == 0 else 1e-3
        for part in ("total_norm", "myopic_norm", "future_norm"):
            assert abs(one[part] - two[part]) <= tol * one["total_norm"], (step, part, one, two)


def _hf_fsdp_worker(out: str) -> None:
    """Run by torchrun (or alone): a tiny myopic HF GPT-2 trained 4 steps on fixed global batches."""
    import torch
    import torch.nn.functional as F
    import transformers
    from torch.distributed.fsdp import FSDPModule

    from myopia.models.hf.myopic import make_myopic
    from myopia.models.hf.presets import HFCausalLM
    from myopia.train.distributed import parallelize, setup

    dist_ = setup("cpu")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=1)
    model = HFCausalLM(make_myopic(transformers.GPT2LMHeadModel(cfg), "myopic"), "gpt2")
    wrapped = parallelize(model, dist_, "fsdp", torch.device("cpu"))
    sharded = [type(m).__name__ for m in wrapped.modules() if isinstance(m, FSDPModule)]
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(4):
        x, y = torch.randint(0, 31, (4, 12), generator=g), torch.randint(0, 31, (4, 12), generator=g)
        loss = F.cross_entropy(wrapped(dist_.shard(x)).transpose(1, 2), dist_.shard(y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(dist_.mean(loss.detach())))
    if dist_.is_main:
        with open(out, "w") as f:
            json.dump({"losses": losses, "sharded": sharded}, f)


def test_hf_gpt2_under_fsdp2_shards_each_decoder_layer_and_matches_one_process(tmp_path):
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}.json"
        code = f"import test_distributed as t; t._hf_fsdp_worker({str(out)!r})"
        launcher = [] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                                          "--no-python"]
        proc = subprocess.run([*launcher, sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads(out.read_text())
    assert results[1]["sharded"] == []
    assert sorted(results[2]["sharded"]) == ["FSDPGPT2Block", "FSDPGPT2Block", "FSDPHFCausalLM"]
    assert results[2]["losses"] == pytest.approx(results[1]["losses"], rel=1e-5)


SLOW_WORKER = """
import os, sys, time
from myopia.tasks.synthetic import SyntheticTask
original = SyntheticTask.train_batch
def slow(self, *a, **k):
    time.sleep(0.05)
    return original(self, *a, **k)
SyntheticTask.train_batch = slow
with open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w") as f:
    f.write(str(os.getpid()))
from myopia.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_to_one_rank_stops_both_at_one_checkpoint_and_resume_matches(single, tmp_path):
    """SLURM or a node agent may signal only some processes: every rank must stop at the same step,
    one consistent checkpoint is written, and --resume ends as the uninterrupted run does."""
    import signal
    import time

    out = tmp_path / "run"
    script = tmp_path / "slow_worker.py"
    script.write_text(SLOW_WORKER)
    args = [a for a in COMMON]
    args[args.index("--train.steps") + 1] = "40"
    args[args.index("--train.checkpoint_every") + 1] = "0"
    ref = tmp_path / "ref"
    launch_args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*launch_args, "--master-port", str(_free_port()), "-m", "myopia.cli", *args, "--out", str(ref)],
                   check=True, capture_output=True, env=env, timeout=300)
    proc = subprocess.Popen([*launch_args, "--master-port", str(_free_port()), str(script), str(tmp_path), *args,
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "myopic" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 8):
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)  # rank 1 only; rank 0 never hears of it
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stderr[-2000:]  # torchrun's own code; its report names the workers'
    # torchrun reports the first worker to leave (exit 75); once one has left it may signal the other,
    # which by then has passed the exit barrier: rank 0's files below are what must be whole
    assert "exitcode  : 75" in stderr, stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == "SIGTERM"  # written by rank 0
    reached = results["arms"]["myopic"]["steps"]
    assert 8 <= reached < 40
    ckpts = os.path.join(out, "myopic", "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == [f"step_{reached:07d}"]
    subprocess.run([*launch_args, "--master-port", str(_free_port()), "-m", "myopia.cli", *args, "--out", str(out),
                    "--resume"], check=True, capture_output=True, env=env, timeout=300)
    assert losses(out) == losses(ref)


def test_fsdp_checkpoint_is_sharded_and_resumes_at_1_and_2_processes(single, tmp_path):
    """Under FSDP each rank writes only its shards (torch.distributed.checkpoint, safetensors files);
    the run resumes at 1 and at 2 processes with the losses of an uninterrupted run, and consolidate()
    rewrites the checkpoint in the single-file format with the same tensors."""
    from myopia.train.checkpoint import consolidate, is_sharded, read_checkpoint

    out = tmp_path / "run"
    launch(out, 2, "--train.parallel", "fsdp")
    step4 = os.path.join(out, "myopic", "checkpoints", "step_0000004")
    assert is_sharded(step4) and not os.path.exists(os.path.join(step4, "model.safetensors"))
    shard_files = [f for f in os.listdir(os.path.join(step4, "shards")) if f.endswith(".safetensors")]
    assert len(shard_files) == 2  # one per rank
    a, ea = losses(single)
    for second in (2, 1):  # the 1-process resume rewrites step 8 unsharded: last
        _rewind_to_step4(out)
        launch(out, second, "--resume", "--train.parallel", "fsdp")
        b, eb = losses(out)
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6) and eb == pytest.approx(ea, rel=1e-5, abs=1e-6)
    weights, optim, state, _ = read_checkpoint(step4)
    consolidate(step4)
    assert not is_sharded(step4) and os.path.exists(os.path.join(step4, "model.safetensors"))
    weights2, optim2, state2, _ = read_checkpoint(step4)
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert state2["step"] == 4 and optim2["state"].keys() == optim["state"].keys()
