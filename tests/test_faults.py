"""Faults injected on purpose: kills during checkpointing and training, a full disk, bad corpora."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import start_slow_cli

from myopia import cli
from myopia.train import checkpoint as ckpt_mod
from myopia.train.checkpoint import (
    CheckpointError,
    capture,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

SAVER = textwrap.dedent("""
    import sys, torch
    from myopia import GPT, GPTConfig
    from myopia.train.checkpoint import capture, save_checkpoint
    model = GPT(GPTConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=128, block_size=64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward(); opt.step()
    step = 0
    while True:
        step += 1
        save_checkpoint(sys.argv[1], step, *capture(model, opt), {"step_note": step}, keep=2)
        print(step, flush=True)
""")


def test_kill_during_checkpointing_keeps_a_loadable_checkpoint(tmp_path):
    from myopia import GPT, GPTConfig

    rng = random.Random(0)
    ckpt_dir = tmp_path / "ckpts"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    model = GPT(GPTConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=128, block_size=64))
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip()  # at least one checkpoint written
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = latest_checkpoint(str(ckpt_dir))
        assert latest is not None
        load_checkpoint(latest, model, restore_rng_state=False)  # verifies checksums


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from myopia import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=8, block_size=8))
    good = save_checkpoint(str(tmp_path), 1, *capture(model, None), {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device.*step_0000001 is kept"):
        save_checkpoint(str(tmp_path), 2, *capture(model, None), {})
    assert latest_checkpoint(str(tmp_path)) == good
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".step")]


def test_full_disk_during_training_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt_mod, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    code = cli.main(["train", "--arms", "vanilla", "--train.steps", "3", "--train.batch_size", "4",
                     "--train.progress", "false", "--model.n_embd", "16", "--model.n_head", "2",
                     "--data.synthetic.seq_len", "8", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "No space left" in err


def test_sigkill_mid_training_resumes_exactly(tmp_path):
    args = ["train", "--arms", "myopic", "--train.steps", "60", "--train.batch_size", "8", "--train.log_every", "1",
            "--train.checkpoint_every", "5", "--train.progress", "false", "--model.n_embd", "16",
            "--model.n_head", "2", "--data.synthetic.seq_len", "8", "--data.synthetic.window", "3"]
    ref = tmp_path / "ref"
    assert cli.main(args + ["--out", str(ref)]) == 0
    out = tmp_path / "killed"
    metrics = out / "myopic" / "metrics.jsonl"
    proc = start_slow_cli(tmp_path, [*args, "--out", str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 23):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = latest_checkpoint(str(out / "myopic" / "checkpoints"))
    saved_step = int(os.path.basename(saved).split("_")[1])
    assert 20 <= saved_step < 60
    assert cli.main(args + ["--out", str(out), "--resume"]) == 0

    def losses(d):
        with open(d / "myopic" / "metrics.jsonl") as f:
            return [json.loads(x)["loss"] for x in f if '"loss"' in x]

    assert losses(out) == losses(ref)


@pytest.mark.parametrize("content,fragment", [(b"", "holds no text"), (b"\xff\xfe\x00bad", "not valid UTF-8")])
def test_bad_corpus_is_a_one_line_error(tmp_path, capsys, content, fragment):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    code = cli.main(["train", "--data.source", "text", "--data.text.corpus", str(corpus), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err and "corpus.txt" in err


def test_vocabulary_mismatch_and_long_window_are_one_line_errors(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: some text to learn from, again and again." for i in range(50)))
    base = ["train", "--arms", "vanilla", "--train.steps", "2", "--train.batch_size", "4", "--train.progress", "false",
            "--model.n_embd", "16", "--model.n_head", "2", "--data.source", "text", "--data.text.corpus", str(corpus)]
    assert cli.main(base + ["--data.text.tokenizer", "byte", "--data.text.seq_len", "16", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    arm = str(tmp_path / "a" / "vanilla")
    code = cli.main(base + ["--data.text.tokenizer", "gpt2", "--data.text.seq_len", "8", "--init_from", arm,
                            "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "50257 token ids" in err and "vocab_size 256" in err
    code = cli.main(base + ["--data.text.tokenizer", "byte", "--data.text.seq_len", "32", "--init_from", arm,
                            "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "window of 32 tokens" in err and "block_size 16" in err
    # A model that fits starts from the checkpoint's weights.
    assert cli.main(base + ["--data.text.tokenizer", "byte", "--data.text.seq_len", "8", "--init_from", arm,
                            "--out", str(tmp_path / "d")]) == 0
