"""Fine-tuning a pretrained model the paper's way (issue 28): the start model scored, the gap against
fine-tuning steps, long windows, held-out halves, and the SmolLM2 presets' recipe."""

import json

import numpy as np
import pytest
import torch
from conftest import write_word_corpus

from myopia import cli
from myopia.config import from_dict
from myopia.experiments.lm.config import PRESETS, LMExperiment
from myopia.tasks.text import TextConfig, TextTask


def _pretrained(tmp_path, folder, steps=20):
    """A tiny GPT trained briefly: the 'pretrained' start of the runs below."""
    out = tmp_path / "pre"
    assert cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out), "--arms", "vanilla",
                     "--train.steps", str(steps), "--analysis.gradient_split_batches", "0"]) == 0
    return str(out / "seed0" / "vanilla")


def test_fine_tuning_reports_the_start_and_the_gap_against_steps(tmp_path):
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    start = _pretrained(tmp_path, folder)
    out = tmp_path / "run"
    assert cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out),
                     "--init_from", start, "--arms", "vanilla,myopic", "--seeds", "0,1", "--train.steps", "12",
                     "--optim.lr", "1e-3", "--train.eval_every", "4", "--train.eval_on_start", "true",
                     "--analysis.long_window", "16", "--analysis.long_window_count", "12",
                     "--analysis.probe_layers", "0,2"]) == 0
    results = json.loads((out / "results.json").read_text())
    # the start model, scored on the analysis windows; each arm compared with it, paired
    assert results["start_loss"]["low"] <= results["start_loss"]["mean"] <= results["start_loss"]["high"]
    assert set(results["vs_start"]) == {"vanilla", "myopic"}
    assert results["vs_start"]["vanilla"]["high"] < 0  # fine-tuning on this corpus helps the brief start
    # the training forward: the first step's loss (same batch, start weights) is the same in both arms
    check = results["first_step_check"]["myopic vs vanilla"]
    assert len(check["per_seed"]) == 2 and check["max_abs"] < 1e-5
    # the gap against fine-tuning steps: step 0 (both arms are the start model) to the end
    rows = results["gap_by_step"]
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    cfg = results["config"]
    per_step = cfg["train"]["batch_size"] * cfg["train"]["grad_accum"] * cfg["data"]["seq_len"]
    assert [r["tokens"] for r in rows] == [0, 4 * per_step, 8 * per_step, 12 * per_step]
    assert rows[0]["per_seed"] == [0.0, 0.0] and rows[0]["gap"] == 0.0  # same model, same batches
    assert rows[0]["baseline_loss"] != rows[-1]["baseline_loss"]
    assert all(r["ci"][0] <= r["gap"] <= r["ci"][1] for r in rows[1:])
    assert results["comparisons"]["myopic vs vanilla"]["by_step"] == rows
    per_seed = [json.loads(line)["eval_loss"] for line in (out / "seed1" / "myopic" / "metrics.jsonl").open()
                if "eval_loss" in line]
    vanilla = [json.loads(line)["eval_loss"] for line in (out / "seed1" / "vanilla" / "metrics.jsonl").open()
               if "eval_loss" in line]
    assert rows[-1]["per_seed"][1] == pytest.approx(per_seed[-1] - vanilla[-1])
    # long windows and probes on chosen layers
    long = results["long_window"]
    assert long["length"] == 16 and long["windows"] == 12 and len(long["arms"]["vanilla"]) == 16
    assert len(long["comparisons"]["myopic vs vanilla"]["gap_per_position"]) == 16
    assert results["probes"]["layers"] == [0, 2] and len(results["probes"]["vanilla"]) == 2
    assert results["resources"]["wall_seconds"] > 0 and results["resources"]["peak_rss_mib"] > 0
    report = (out / "report.md").read_text()
    assert "start model (step 0;" in report and "## Gap against fine-tuning steps" in report
    assert f"| 12 | {12 * per_step:,} |" in report  # the gap table counts each arm's training tokens
    assert "## Gap by position over 16-token windows" in report and "+1.07" in report
    for png in ("gap_by_step.png", "gap_by_position_long.png"):
        assert (out / png).is_file()


def test_an_arm_that_has_not_moved_equals_its_start_window_by_window(tmp_path):
    """With a learning rate of 0 in effect, every arm is still the start: arm − start is 0 on every
    analysis window, so the start is scored on the arms' windows and with their forward pass. One seed:
    the gap-by-step rows carry no interval."""
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    start = _pretrained(tmp_path, folder)
    out = tmp_path / "run"
    assert cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out), "--init_from", start,
                     "--arms", "vanilla,myopic,bigram", "--train.steps", "2", "--optim.lr", "1e-30",
                     "--optim.weight_decay", "0", "--train.eval_on_start", "true", "--train.eval_every", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("vanilla", "myopic"):
        assert abs(results["vs_start"][name]["mean"]) < 1e-6 and abs(results["vs_start"][name]["high"]) < 1e-6
    assert "bigram" in results["vs_start"]  # scored too (on this i.i.d.-word corpus it is about the start)
    assert [r["step"] for r in results["gap_by_step"]] == [0, 1, 2] and results["gap_by_step"][0]["ci"] is None
    assert set(results["first_step_check"]) == {"myopic vs vanilla"}  # not bigram: its forward differs


def test_long_window_beyond_the_models_context_is_a_one_line_error(tmp_path, capsys):
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    code = cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(tmp_path / "r"),
                     "--arms", "vanilla,myopic", "--train.steps", "2", "--analysis.long_window", "64"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "analysis.long_window=64" in err and "context is 16 tokens" in err and "--analysis.long_window 16" in err


def test_a_pretrained_hf_model_is_not_pretrained_again(tmp_path, capsys):
    """--preset cpu pretrains its start for 1,000 steps at lr 3e-3: on a pretrained model that would
    destroy it, so it is refused in one line naming the fix."""
    transformers = pytest.importorskip("transformers")
    folder = write_word_corpus(tmp_path / "corpus", 20, 100)
    ckpt = tmp_path / "ckpt"
    cfg = transformers.GPT2Config(vocab_size=600, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(ckpt)
    code = cli.main(["lm", "--data.corpus", str(folder), "--data.tokenizer", "bpe", "--data.vocab_size", "512",
                     "--hf_model", str(ckpt), "--out", str(tmp_path / "r")])  # the default preset: cpu
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pretrain.steps=1000" in err and "--pretrain.steps 0" in err and "smollm2-cpu" in err


def test_heldout_halves_are_disjoint_and_cover_the_heldout_documents(tmp_path):
    folder = write_word_corpus(tmp_path / "corpus", 80, 200)
    tasks = {part: TextTask(TextConfig(corpus=str(folder), tokenizer="byte", seq_len=16, heldout_fraction=0.2,
                                       heldout_part=part, cache_dir=str(tmp_path / "cache")), 0, log=lambda *a: None)
             for part in ("all", "tune", "report")}
    titles = {part: set(t.heldout_titles) for part, t in tasks.items()}
    assert titles["tune"] and titles["report"] and not titles["tune"] & titles["report"]
    assert titles["tune"] | titles["report"] == titles["all"]
    assert abs(len(titles["tune"]) - len(titles["report"])) <= 1
    assert np.array_equal(tasks["tune"].train.tokens, tasks["all"].train.tokens)  # training text unchanged
    with pytest.raises(ValueError, match="heldout_part='dev'"):
        TextConfig(heldout_part="dev")


@pytest.mark.parametrize("name", ["smollm2-cpu", "smollm2-where-cpu"])
def test_smollm2_presets_fine_tune_the_pretrained_model(name):
    """The SmolLM2 presets start every arm from the pretrained model (no pretraining stage), score the
    start, report on the held-out half the recipe was not chosen on, and trace the gap over steps."""
    cfg = from_dict(LMExperiment, PRESETS[name])
    assert cfg.hf_model == "smollm2-135m" and cfg.data.tokenizer == "smollm2"
    assert cfg.pretrain.steps == 0 and not cfg.init_from
    assert cfg.data.heldout_part == "report" and cfg.seeds == [0, 1, 2]
    assert cfg.train.steps % cfg.train.eval_every == 0 and cfg.arms[:2] == ["vanilla", "myopic"]
    if name == "smollm2-cpu":
        assert cfg.train.eval_on_start and cfg.train.steps // cfg.train.eval_every + 1 >= 6  # gap-by-step points
        assert cfg.analysis.heldout_windows * cfg.data.seq_len >= 100_000
        assert cfg.analysis.long_window == 256


def test_bf16_forward_of_the_fused_myopic_op_matches_vanilla_on_cpu():
    """Under bf16 autocast (--train.precision bf16) the myopic arm's training forward (the fused op, with
    gradients on) must give vanilla's logits to bf16 precision."""
    transformers = pytest.importorskip("transformers")
    from myopia.models.hf.myopic import make_myopic

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    x = torch.randint(0, 64, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vanilla = model(input_ids=x, use_cache=False).logits.float()
        make_myopic(model, "myopic")
        myopic = model(input_ids=x, use_cache=False).logits.float()
    assert myopic.requires_grad and (myopic - vanilla).abs().max().item() < 2e-2


def test_the_gap_plot_uses_a_token_axis_and_a_log_scale_for_log_spaced_evaluations(tmp_path, monkeypatch):
    from myopia.analysis import plots
    from myopia.experiments.lm import steps

    if plots.pyplot() is None:
        pytest.skip("matplotlib is not installed")
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    comparisons = {"myopic vs vanilla": {"treatment": "myopic", "baseline": "vanilla"}}

    def rows(at):
        return {"myopic vs vanilla": [{"step": s, "tokens": 512 * s, "gap": 0.01, "ci": [0.0, 0.02],
                                       "treatment_loss": 3.0, "baseline_loss": 2.99} for s in at]}

    assert steps.plot(rows([0, 1, 2, 4, 64, 512]), comparisons, "myopic vs vanilla", str(tmp_path / "a.png"))
    assert steps.plot(rows([0, 4, 8, 12]), comparisons, "myopic vs vanilla", str(tmp_path / "b.png"))
    (log_left, log_right), (lin_left, _) = figures[0].axes, figures[1].axes
    assert log_left.get_xscale() == log_right.get_xscale() == "symlog" and lin_left.get_xscale() == "linear"
    assert log_right.get_xlabel() == "fine-tuning tokens per arm"
    assert max(log_right.lines[0].get_xdata()) == 512 * 512
    low, high = log_right.get_xlim()  # no negative decades left of step 0; ticks at 0 and powers of 10
    assert -512 < low < 0 and high >= 512 * 512
    assert list(log_right.get_xticks()) == [0, 1e3, 1e4, 1e5]
