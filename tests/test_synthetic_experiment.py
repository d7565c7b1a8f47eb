"""The synthetic experiment end to end: a short run already separates vanilla from myopic."""

import json

from myopia import cli
from myopia.config import from_dict, merge
from myopia.experiments import synthetic


def test_short_run_vanilla_computes_the_feature_and_myopic_does_not(tmp_path):
    cfg = from_dict(synthetic.SyntheticExperiment, merge(synthetic.PRESETS["cpu"], {
        "out": str(tmp_path / "run"), "control_arms": [],
        "model": {"n_embd": 64}, "optim": {"lr": 3e-3},
        "train": {"steps": SHORT_STEPS, "batch_size": 64, "eval_every": 0, "checkpoint_every": 0, "eval_batches": 4,
                  "progress": False},
        "probe": {"train_sequences": 1024, "test_sequences": 512},
    }))
    results = synthetic.run(cfg)
    s = results["summary"]["shift1_p1"]
    vanilla_gain = s["vanilla"]["r2_layer1_fx_gain"]["mean"]
    myopic_gain = s["myopic"]["r2_layer1_fx_gain"]["mean"]
    assert vanilla_gain > 0.15
    assert myopic_gain < vanilla_gain - 0.15
    assert s["vanilla"]["ratio_to_trivial"]["mean"] < s["myopic"]["ratio_to_trivial"]["mean"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "completed" and (tmp_path / "run" / "report.md").exists()


SHORT_STEPS = 800


def test_reproduce_command_writes_a_report(tmp_path):
    out = tmp_path / "repro"
    assert cli.main(["reproduce", "--out", str(out), "--synthetic_steps", "3", "--progress", "false"]) == 0
    assert (out / "report.md").exists() and (out / "synthetic" / "report.md").exists()
    results = json.loads((out / "synthetic" / "results.json").read_text())
    assert set(results["conditions"]) == {"shift1_p1", "shift0_p1"}
