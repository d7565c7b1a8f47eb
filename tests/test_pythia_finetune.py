"""The paper's Pythia protocol (§4.2) as `myopia sweep --preset pythia-finetune`: pretrained weights in
both arms, the document-starts windows read once per epoch, Pythia's learning rates for hub names, and
the gap table; offline, through the same code path, with a tiny GPT-NeoX checkpoint and a text folder."""

from dataclasses import replace
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from myopia import cli
from myopia.config import ConfigError
from myopia.data.corpus import DataError, load_documents, split_documents
from myopia.experiments import sweep
from myopia.experiments.sweep.pipeline import _lm_config, _paper_gap, epoch_steps
from myopia.tasks.text import TextConfig, TextTask
from myopia.train.config import TrainConfig

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "and", "then", "it", "was", "very"]


def _corpus(folder, lengths, seed=0):
    """One document per length (in words); the short ones have fewer tokens than a window."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i, n in enumerate(lengths):
        (folder / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS, size=n)) + ".")
    return folder


def _expected_starts(task: TextTask, corpus: str, heldout_fraction: float) -> list[list[int]]:
    """The first seq_len + 1 tokens of every training document that long, encoded afresh, in file order."""
    train, _ = split_documents(load_documents(corpus), heldout_fraction)
    encoded = [task.tokenizer.encode_batch([d.text])[0] for d in train]
    return [ids[: task.seq_len + 1] for ids in encoded if len(ids) >= task.seq_len + 1]


def test_document_starts_batches_are_reproducible_and_read_each_window_once_per_epoch(tmp_path):
    lengths = [2, 9, 3, 12, 5, 30, 4, 8, 2, 20] * 3  # bytes: "xx yy." ... some below 17 bytes
    corpus = str(_corpus(tmp_path / "docs", lengths))
    cfg = TextConfig(corpus=corpus, tokenizer="byte", seq_len=16, windows="document_starts", micro_batches=2,
                     heldout_fraction=0.2)
    task = TextTask(cfg, seed=3)

    # The windows are the first 17 tokens of the long-enough training documents, in file order.
    expected = _expected_starts(task, corpus, 0.2)
    n = task.epoch_windows
    assert n == len(expected) and 0 < n < len(split_documents(load_documents(corpus), 0.2)[0])
    got = [task.train.tokens[s:s + 17].tolist() for s in task.train_windows]
    assert got == expected
    off = task.heldout.doc_offsets  # held out: each long-enough document's first window
    assert task.heldout_windows[:, 0].tolist() == [int(off[d]) for d in range(task.heldout.n_docs)
                                                   if off[d + 1] - off[d] >= 17]

    # Two epochs read micro-batch by micro-batch (3 windows, 2 micro-batches a step; 6 does not divide
    # n, so a step straddles the epochs): each epoch is a permutation of the windows, the second another.
    reads = []
    for step in range(-(-2 * n // 6)):
        for micro in range(2):
            x, y = task.train_batch(step, micro, 3)
            assert torch.equal(x[:, 1:], y[:, :-1])
            reads += [tuple(x[i].tolist()) + (int(y[i, -1]),) for i in range(3)]
    first, second = reads[:n], reads[n:2 * n]
    assert sorted(first) == sorted(map(tuple, expected)) == sorted(second)
    assert first != second

    # A pure function of (seed, step, micro): a new task, out-of-order calls and resumes agree.
    again = TextTask(cfg, seed=3)
    for step, micro in [(5, 1), (0, 0), (2, 1), (5, 1)]:
        assert torch.equal(again.train_batch(step, micro, 3)[0], task.train_batch(step, micro, 3)[0])
    other = task.with_seed(4)
    assert not torch.equal(other.train_batch(0, 0, 3)[0], task.train_batch(0, 0, 3)[0])
    assert torch.equal(task.with_seed(3).train_batch(1, 0, 3)[0], task.train_batch(1, 0, 3)[0])

    with pytest.raises(DataError, match="data.micro_batches"):
        task.train_batch(0, 2, 3)  # a third micro-batch: the loop's grad_accum is not the data's
    with pytest.raises(DataError, match="shorter data.seq_len"):
        TextTask(TextConfig(corpus=corpus, tokenizer="byte", seq_len=200, windows="document_starts",
                            heldout_fraction=0.2), seed=0)
    with pytest.raises(ValueError, match="windows"):
        TextConfig(windows="starts")


def test_preset_learning_rates_and_names():
    preset = sweep.PRESETS["pythia-finetune"]
    assert preset["models"][0] == "hf:EleutherAI/pythia-14m" and preset["models"][-1] == "hf:EleutherAI/pythia-2.8b"
    assert sweep.PRESETS["pythia-scaling"] is sweep.PRESETS["pythia-shapes-scratch"]
    cfg = sweep.SweepExperiment(lr_from_preset=0.4)
    assert _lm_config(cfg, "hf:EleutherAI/pythia-70m").optim.lr == pytest.approx(0.4 * 1e-3)
    assert _lm_config(cfg, "hf:EleutherAI/pythia-2.8b").optim.lr == pytest.approx(0.4 * 1.6e-4)
    assert _lm_config(cfg, "pythia-160m").optim.lr == pytest.approx(0.4 * 6e-4)
    assert _lm_config(cfg, "hf:EleutherAI/gpt-neo-125m").optim.lr == cfg.optim.lr  # not a Pythia model
    assert _paper_gap("hf:EleutherAI/pythia-2.8b") == 0.249
    assert _paper_gap("hf:EleutherAI/pythia-70m-deduped") is None  # the paper used the non-deduped ones


def _eval_loss(model, task, batches, batch_size):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(batches):
            x, y = task.heldout_batch(i, batch_size)
            logits = model(input_ids=x).logits
            total += float(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="sum"))
            count += y.numel()
    return total / count


def test_pythia_finetune_preset_end_to_end_from_a_local_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=50304, max_position_embeddings=64,
                                        rotary_pct=0.25, use_parallel_residual=True)
    original = transformers.GPTNeoXForCausalLM(config).eval()
    ckpt = tmp_path / "pythia-tiny"
    original.save_pretrained(ckpt)
    corpus = str(_corpus(tmp_path / "docs", [40, 3, 25, 60, 2, 35, 30, 4, 45, 28] * 3))
    out = tmp_path / "sweep"
    args = ["sweep", "--preset", "pythia-finetune", "--models", str(ckpt), "--data.corpus", corpus,
            "--data.seq_len", "16", "--data.heldout_fraction", "0.25", "--train.batch_size", "2",
            "--train.grad_accum", "2", "--train.eval_batches", "2", "--train.progress", "false", "--train.device", "cpu",
            "--analysis.heldout_windows", "8", "--analysis.bootstrap", "50", "--analysis.probe_train_windows", "16",
            "--analysis.probe_classes", "8", "--analysis.top_kl", "3", "--analysis.first_position_tokens", "64",
            "--analysis.gradient_split_batches", "0", "--train.precision", "fp32", "--out", str(out)]
    assert cli.main(args) == 0  # (float32: the step-0 loss is compared with a float32 forward below)
    results = json.loads((out / "results.json").read_text())

    # One epoch: every long-enough training document's first window once, 4 windows a step.
    data = TextConfig(**{**results["config"]["data"], "corpus": corpus})
    assert data.windows == "document_starts" and data.micro_batches == 2
    task = TextTask(data, seed=0)
    n = task.epoch_windows
    assert n == len(_expected_starts(task, corpus, 0.25))
    assert results["epoch"] == {"epochs": 1, "windows_per_epoch": n, "steps": n // 4, "windows_unread": n % 4}
    assert results["config"]["train"]["steps"] == n // 4 >= 2
    # The loop's batches (train_batch(step, micro, 2) for its steps and 2 micro-batches): distinct
    # document starts, every long-enough document's but the last partial step's.
    read = [tuple(w) for step in range(n // 4) for micro in range(2)
            for w in torch.cat(task.train_batch(step, micro, 2), 1)[:, [*range(16), -1]].tolist()]
    expected_windows = {tuple(w) for w in _expected_starts(task, corpus, 0.25)}
    assert len(set(read)) == len(read) == 4 * (n // 4) and set(read) <= expected_windows

    # Both arms start from the checkpoint's weights: their step-0 held-out loss is the checkpoint's.
    expected = _eval_loss(original, task, 2, 2)
    run_dir = out / str(ckpt).replace("/", "_").replace(":", "_")
    for arm in ("vanilla", "myopic"):
        rows = [json.loads(line) for line in (run_dir / "seed0" / arm / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "eval_loss" in r]
        assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(expected, rel=1e-5)
        assert max(r["step"] for r in rows) == n // 4
        assert evals[-1]["eval_loss"] != pytest.approx(expected, rel=1e-6)  # and then they trained

    # The gap table.
    [row] = results["models"]
    assert row["model"] == str(ckpt) and row["lr"] == pytest.approx(1e-3) and row["paper_gap"] is None
    gap = row["comparisons"]["myopic vs vanilla"]["gap"]
    assert np.isfinite(gap["mean"]) and gap["low"] <= gap["mean"] <= gap["high"]
    assert set(row["arms"]) == {"vanilla", "myopic"}
    report = (out / "report.md").read_text()
    assert "first 17 tokens as one window" in report and "pretrained weights" in report

    # Too few windows for one step: one line naming the fix.
    cfg = sweep.SweepExperiment(data=replace(data, micro_batches=0), train=TrainConfig(batch_size=64), epochs=1)
    with pytest.raises(ConfigError, match="fewer than one step") as err:
        epoch_steps(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.windows document_starts"):
        epoch_steps(sweep.SweepExperiment(epochs=1))  # random windows have no epoch


def test_a_float16_checkpoint_trains_in_float32(tmp_path):
    """The released Pythia checkpoints are stored in float16; transformers 5 loads a checkpoint in its
    stored dtype by default. myopia fine-tunes float32 weights (autocast does the low precision)."""
    transformers = pytest.importorskip("transformers")
    from myopia.models.hf.presets import build_hf_model

    config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=300, max_position_embeddings=64)
    transformers.GPTNeoXForCausalLM(config).half().save_pretrained(tmp_path / "fp16")
    model = build_hf_model(str(tmp_path / "fp16"), "vanilla", vocab_size=256, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_micro_batches_follow_grad_accum_and_a_different_value_is_one_line():
    data = TextConfig(corpus="unused", windows="document_starts")
    assert data.micro_batches == 0 and data.for_grad_accum(4).micro_batches == 4
    assert replace(data, micro_batches=4).for_grad_accum(4).micro_batches == 4
    with pytest.raises(DataError, match=r"data.micro_batches=2 but train.grad_accum=4.*leave --data.micro_batches at 0"):
        replace(data, micro_batches=2).for_grad_accum(4)
