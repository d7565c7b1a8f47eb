"""``myopia answer`` end to end on tiny settings, its presets and its one-line errors."""

import json

import pytest
import torch
import yaml

from myopia import cli


def _run(args, tmp_path, name):
    out = tmp_path / name
    assert cli.main(["answer", *args, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_multiply_tiny_writes_results_report_and_plots(tmp_path):
    out, res = _run(["--preset", "tiny", "--seeds", "0,1", "--arms", "vanilla,myopic,myopic:h=1:name=h1"],
                    tmp_path, "mul")
    assert res["status"] == "completed" and res["task"] == "multiply"
    assert set(res["conditions"]) == {"pad2", "pad4"}
    run = res["conditions"]["pad4"]["runs"]["1"]["h1"]
    assert run["generated"]["n"] == 64 and len(run["generated"]["position_accuracy"]) == 4
    gain = res["filler_gain"]
    assert (gain["from"], gain["to"]) == ("pad2", "pad4")
    lo, hi = res["conditions"]["pad2"]["runs"], res["conditions"]["pad4"]["runs"]
    expected = [hi[s]["vanilla"]["generated"]["exact_match"] - lo[s]["vanilla"]["generated"]["exact_match"]
                for s in ("0", "1")]
    assert gain["arms"]["vanilla"]["per_seed"] == expected and gain["arms"]["vanilla"]["low"] is not None
    assert "myopic vs vanilla" in gain["pairs"] and "h1 vs vanilla" in res["comparisons"]["pad2"]
    report = (out / "report.md").read_text()
    assert "Filler gain" in report and "pad 10 **0.99**" in report and "| pad4 | h1 |" in report
    assert res["conditions"]["pad2"]["example"]["prompt"].endswith("=")
    run0 = res["conditions"]["pad2"]["runs"]["0"]["vanilla"]
    unseen = run0["generated"]["unseen"]  # 1-2 digit operands: training draws many of the 64 prompts
    assert run0["seen_in_training"] > 0 and run0["seen_in_training"] + (unseen["n"] if unseen else 0) == 64
    assert "drawn in training" in report and "seen_in_training" in res["summary"]["pad2"]["vanilla"]
    assert (out / "exact_match.png").exists() and (out / "position_accuracy.png").exists()


def test_parity_and_path_star_tiny(tmp_path):
    _, par = _run(["--task", "parity", "--preset", "tiny", "--arms", "vanilla,myopic"], tmp_path, "par")
    assert list(par["conditions"]) == ["bits6"] and "filler_gain" not in par
    assert par["config"]["parity"]["bits"] == 6
    out, ps = _run(["--task", "path-star", "--preset", "tiny", "--train.steps", "5"], tmp_path, "ps")
    assert list(ps["conditions"]) == ["standard", "reverse", "teacherless"]
    s = ps["summary"]["teacherless"]["vanilla"]
    # teacherless answers come from the one forward pass: generated = teacher-forced
    assert s["generated"]["first"]["mean"] == s["teacher_forced"]["first"]["mean"]
    assert "Chance here: 1/2" in (out / "report.md").read_text()
    assert "teacherless mode" in (out / "report.md").read_text()
    out, _ = _run(["--task", "path-star", "--preset", "tiny", "--train.steps", "5", "--modes", "standard"],
                  tmp_path, "ps-standard")
    assert "teacherless mode" not in (out / "report.md").read_text()  # only a run with that mode says so


def test_paper_preset_prints_the_papers_settings(capsys):
    assert cli.main(["answer", "--preset", "paper", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["task"] == "multiply" and cfg["pads"] == [5, 10]
    # the reference trains on 1-5 digit operands and scores 5x5-digit products, without gradient clipping
    assert cfg["multiply"] == {"min_digits": 1, "max_digits": 5, "x_pad": 0, "y_pad": 0, "eval_min_digits": 5}
    assert cfg["optim"]["grad_clip"] == 0.0
    assert (cfg["model"]["n_layer"], cfg["model"]["n_head"], cfg["model"]["n_embd"]) == (12, 12, 768)
    assert cfg["train"]["batch_size"] * cfg["train"]["steps"] >= 10_000_000 - 1024
    assert cfg["train"]["precision"] == "bf16" and cfg["optim"]["lr"] == 6e-4 and cfg["optim"]["weight_decay"] == 0.01
    assert cfg["optim"]["warmup"] == 0.01 and cfg["arms"] == ["vanilla", "myopic"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "--pads", "1,4"],
     "pads: pad 1 does not fit multiply.max_digits=2 digits; use pads of 2 or more"),
    (["--preset", "tiny", "--pads", "", "--multiply.max_digits", "3", "--multiply.x_pad", "2"],
     "x_pad=2 does not fit max_digits=3 digits; set --multiply.x_pad 3"),
    (["--preset", "tiny", "--model.block_size", "8"], "model.block_size=8 is shorter than pad2's prompt + answer"),
    (["--task", "path-star", "--preset", "tiny", "--path_star.nodes", "5"], "set --path_star.nodes 7 or more"),
    (["--task", "path-star", "--preset", "tiny", "--path_star.length", "0"], "the answer is empty"),
    (["--task", "parity", "--preset", "paper"], "'paper' has no parity version; choose --preset cpu or tiny"),
    (["--task", "sums"], "task='sums' is not one of multiply, path-star, parity"),
    (["--preset", "tiny", "--pads", "1", "--multiply.min_digits", "1", "--multiply.max_digits", "1",
      "--eval_samples", "2000", "--exclude_heldout", "true"], "or turn --exclude_heldout off"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path, capsys):
    assert cli.main(["answer", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_exclude_heldout_keeps_scored_and_loss_prompts_out_of_training(tmp_path, monkeypatch):
    from myopia.tasks.answer import AnswerTask, prompt_keys

    drawn = {"train": [], "loss": [], "scored": []}

    def recording(name, kind):
        original = getattr(AnswerTask, name)

        def record(self, *args):
            out = original(self, *args)
            drawn[kind].append(prompt_keys(out[0][:, : self.prompt_len]))
            return out
        monkeypatch.setattr(AnswerTask, name, record)

    recording("train_batch", "train")  # the loop's draws (and their regeneration after training)
    recording("heldout_batch", "loss")  # the loop's held-out loss
    recording("heldout_examples", "scored")  # the scored prompts (and the loss's, which it builds on)
    # 16 scored prompts; the held-out loss reads 4 batches of 32, prompts the scoring never sees
    args = ["--preset", "tiny", "--seeds", "0", "--arms", "vanilla", "--pads", "2", "--eval_samples", "16",
            "--train.eval_batches", "4"]

    def overlap(run_args, name):
        for keys in drawn.values():
            keys.clear()
        _, res = _run(run_args, tmp_path, name)
        train = torch.cat(drawn["train"])
        return res, {kind: int(torch.isin(torch.cat(drawn[kind]), train).sum()) for kind in ("loss", "scored")}

    shared, plain = overlap(args, "shared")
    assert plain["loss"] > 0 and plain["scored"] > 0  # 1-2 digit operands: training draws held-out prompts
    assert shared["conditions"]["pad2"]["runs"]["0"]["vanilla"]["seen_in_training"] > 0
    apart, excluded = overlap([*args, "--exclude_heldout", "true"], "apart")
    assert excluded == {"loss": 0, "scored": 0}
    run = apart["conditions"]["pad2"]["runs"]["0"]["vanilla"]
    assert run["seen_in_training"] == 0 and run["generated"]["unseen"]["n"] == 16


def test_exclude_heldout_refuses_a_resume_that_changes_the_heldout_set(tmp_path, capsys):
    args = ["--task", "parity", "--preset", "tiny", "--train.steps", "5", "--arms", "vanilla", "--seeds", "0",
            "--out", str(tmp_path / "r")]
    assert cli.main(["answer", *args, "--exclude_heldout", "true"]) == 0
    capsys.readouterr()
    for change, trained in ((["--eval_samples", "32"], "eval_samples=64"), ([], "exclude_heldout=True")):
        assert cli.main(["answer", *args, "--resume", "true", *change,
                         *(["--exclude_heldout", "true"] if change else [])]) == 2
        err = capsys.readouterr().err
        assert f"was trained with {trained}" in err and err.count("\n") == 1
    assert cli.main(["answer", *args, "--resume", "true", "--exclude_heldout", "true"]) == 0  # the same: fine


def test_resume_after_completion_rescores_the_same_models(tmp_path):
    args = ["--task", "parity", "--preset", "tiny", "--train.steps", "5", "--seeds", "3"]
    _, first = _run(args, tmp_path, "r")
    _, again = _run([*args, "--resume", "true"], tmp_path, "r")
    for arm in ("vanilla", "myopic"):
        a, b = (r["conditions"]["bits6"]["runs"]["3"][arm] for r in (first, again))
        assert a["generated"] == b["generated"] and a["eval_loss"] == b["eval_loss"]


def test_first_node_is_the_sources_child_in_every_mode():
    from myopia.experiments.answer import summarise

    def run(acc):
        score = {"exact_match": 0.0, "position_accuracy": acc, "exact_match_ci": [0, 1]}
        return {"eval_loss": 1.0, "generated": score, "teacher_forced": score}

    results = {"conditions": {m: {"mode": m, "answer_len": 3, "runs": {"0": {"vanilla": run([0.5, 0.9, 1.0])}}}
                              for m in ("standard", "reverse")}}
    s = summarise(results)
    assert s["standard"]["vanilla"]["generated"]["first"]["mean"] == 0.5
    assert s["reverse"]["vanilla"]["generated"]["first"]["mean"] == 1.0  # reverse ends with the source's child
    assert abs(s["reverse"]["vanilla"]["generated"]["rest"]["mean"] - 0.7) < 1e-12
