"""The synthetic experiment end to end through the reproduce command."""

import json

from myopia import cli


def test_reproduce_command_writes_a_report(tmp_path):
    out = tmp_path / "repro"
    assert cli.main(["reproduce", "--out", str(out), "--synthetic_steps", "3", "--progress", "false"]) == 0
    assert (out / "report.md").exists() and (out / "synthetic" / "report.md").exists()
    results = json.loads((out / "synthetic" / "results.json").read_text())
    assert set(results["conditions"]) == {"shift1_p1", "shift0_p1"}
