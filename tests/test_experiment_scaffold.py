"""What every experiment shares: the results envelope (status, environment, atomic write), the
(treatment, baseline) pairs its analyses compare, and the new arm kinds through `myopia train`."""

import json

import pytest

from myopia import cli
from myopia.config import ConfigError
from myopia.runs.pairs import Pair, default_pairs, parse_pairs
from myopia.runs.results import Results, Status, recording

ARMS = ["vanilla", "myopic", "myopic:h=2", "myopic:layers=0", "local-myopic"]


def test_default_pairs_compare_every_arm_with_vanilla():
    assert default_pairs(ARMS) == [Pair("myopic", "vanilla"), Pair("myopic:h=2", "vanilla"),
                                   Pair("myopic:layers=0", "vanilla")]
    assert default_pairs(["myopic", "bigram"]) == []
    assert parse_pairs(["myopic:h=2/myopic"], ARMS, "analysis.pairs") == [Pair("myopic:h=2", "myopic")]
    assert Pair("myopic:h=2", "myopic").label == "myopic:h=2 vs myopic"


@pytest.mark.parametrize("spec,message", [
    ("myopic", "is not TREATMENT/BASELINE"),
    ("myopic/", "is not TREATMENT/BASELINE"),
    ("myopic:h=8/vanilla", "names the arm 'myopic:h=8', which is not trained here"),
    ("myopic/myopic", "compares an arm with itself"),
])
def test_a_bad_pair_is_a_one_line_error_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_pairs([spec], ARMS, "analysis.pairs")
    assert str(info.value).startswith("analysis.pairs: ") and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="given twice"):
        parse_pairs(["myopic/vanilla", "myopic/vanilla"], ARMS, "pairs")


def test_results_envelope_records_status_and_failure(tmp_path):
    results = Results("demo", {"x": 1}, body={"rows": []})
    data = results.write(str(tmp_path), Status.COMPLETED)
    assert list(data)[:4] == ["experiment", "status", "config", "environment"]
    assert json.loads((tmp_path / "results.json").read_text()) == data and data["status"] == "completed"
    assert {"torch", "device", "threads", "date"} <= set(data["environment"])
    failing, fail = Results("demo", {"x": 1}), tmp_path / "fail"
    fail.mkdir()
    with pytest.raises(ZeroDivisionError), recording(failing, str(fail)):
        1 / 0
    written = json.loads((fail / "results.json").read_text())
    assert written["status"] == "failed" and written["error"].startswith("ZeroDivisionError")
    done = tmp_path / "done"
    Results("demo", {"x": 1}).write(str(done), Status.COMPLETED)
    with pytest.raises(RuntimeError), recording(Results("demo", {"x": 2}), str(done)):
        raise RuntimeError("refused: the folder holds another run")  # e.g. no --resume
    assert json.loads((done / "results.json").read_text())["status"] == "completed"  # not overwritten


def test_train_takes_horizon_and_per_layer_arms(tmp_path):
    out = tmp_path / "run"
    arms = "vanilla,myopic,myopic:h=2,myopic:layers=0"
    assert cli.main(["train", "--arms", arms, "--train.steps", "3", "--train.batch_size", "4",
                     "--train.progress", "false", "--model.n_embd", "16", "--model.n_head", "2",
                     "--data.synthetic.seq_len", "8", "--data.synthetic.window", "3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "train" and results["status"] == "completed"
    assert list(results["arms"]) == arms.split(",")
    assert all(r["status"] == "completed" and r["steps"] == 3 for r in results["arms"].values())
    assert all((out / name / "metrics.jsonl").is_file() for name in arms.split(","))
    # the cuts are real: after identical starts, the arms' held-out losses differ from vanilla's
    losses = [r["eval"]["loss"] for r in results["arms"].values()]
    assert all(loss != losses[0] for loss in losses[1:])


def test_a_cut_naming_a_missing_block_fails_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--arms", "vanilla,myopic:layers=7", "--train.steps", "3", "--train.batch_size", "4",
                     "--train.progress", "false", "--model.n_embd", "16", "--model.n_head", "2",
                     "--data.synthetic.seq_len", "8", "--data.synthetic.window", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "arm 'myopic:layers=7'" in err[0] and "layer 7 does not exist" in err[0]
    assert not (out / "vanilla" / "metrics.jsonl").exists()
