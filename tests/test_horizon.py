"""Issue 15's machinery on tiny settings: the gap-vs-horizon curve, the per-layer table, per-seed
pretraining, gap vs context length, the synthetic horizon × shift grid, and the new presets."""

import json

import pytest
import yaml
from conftest import write_word_corpus

from myopia import cli
from myopia.attention.cut import Cut
from myopia.experiments.lm.cuts import horizon_curves

FAST = ["--analysis.gradient_split_batches", "0", "--analysis.first_position_tokens", "200",
        "--analysis.probe_train_windows", "16", "--analysis.heldout_windows", "32", "--analysis.top_kl", "2"]


def test_horizon_curve_layer_table_and_per_seed_pretraining(tmp_path, capsys):
    folder = write_word_corpus(tmp_path / "corpus", 40, 200)
    out = tmp_path / "run"
    arms = "vanilla,myopic,myopic:h=0:name=h0,myopic:h=2:name=h2,myopic:h=15:name=h15," \
           "myopic:layers=0:name=L0,myopic:layers=1:name=L1"
    code = cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out), "--arms", arms,
                     "--train.steps", "4", "--seeds", "0,1", "--pretrain.steps", "3", "--pretrain.per_seed", "true",
                     *FAST])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    # per-seed pretraining: one start per seed, and the intervals are not conditional on one start
    assert results["start"] == {"kind": "pretrained_per_seed", "conditional_on_one_start": False}
    assert set(results["pretraining_per_seed"]) == {"0", "1"} and "pretraining" not in results
    for seed in (0, 1):
        assert (out / "pretrain" / f"seed{seed}" / "vanilla" / "metrics.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert "each seed's arms fine-tuning that seed's own vanilla model" in report
    assert "conditional on one starting model" not in report
    # the horizon curve: h0 (with plain myopic as its reference), h2, h15 = T-1 (vanilla exactly)
    (curve,) = results["horizon_curves"]
    assert [p["horizon"] for p in curve["points"]] == [0, 2, 15] and curve["plain"]["treatment"] == "myopic"
    gaps = results["comparisons"]
    assert gaps["h0 vs vanilla"]["gap"]["mean"] == gaps["myopic vs vanilla"]["gap"]["mean"]  # the same cut
    assert abs(gaps["h15 vs vanilla"]["gap"]["mean"]) < 1e-9  # h >= T-1 trains vanilla
    assert curve["checks"] == {"h0_agrees_with_plain": True, "full_horizon_includes_zero": True}
    w = curve["smallest_horizon_including_zero"]
    assert w is not None and w <= 15
    assert f"The smallest horizon whose gap interval includes 0: **w = {w}**" in report
    assert "Check: gap(h=0) agrees" in report and "Check: gap(h=T−1) includes 0" in report
    assert (out / "gap_vs_horizon.png").is_file()
    # the per-layer table: both single layers, their sum and the all-layer cut
    (table,) = results["layer_sums"].values()
    assert table["layers"] == [0, 1] and table["all"] == "myopic vs vanilla"
    total = gaps["L0 vs vanilla"]["gap"]["mean"] + gaps["L1 vs vanilla"]["gap"]["mean"]
    assert table["sum_of_single_layer_gaps"]["mean"] == pytest.approx(total, abs=1e-9)
    assert table["all_layer_gap"]["mean"] == pytest.approx(gaps["myopic vs vanilla"]["gap"]["mean"], abs=1e-9)
    assert table["sum_minus_all"]["n"] == 2  # an interval over the two seeds
    assert "| sum of the parts' gaps |" in report and "| layer 0 only (L0) |" in report and "| sum − all |" in report
    assert "smallest horizon whose gap interval includes 0" in capsys.readouterr().out


def _ci(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "n": 3}


def test_horizon_curve_names_none_when_no_interval_includes_zero():
    cuts = {"myopic": Cut.parse("myopic"), "h4": Cut.parse("myopic:h=4"), "h1": Cut.parse("myopic:h=1"),
            "k2": Cut.parse("myopic_kv:h=2"), "bigram": Cut.parse("bigram")}
    comps = {f"{n} vs vanilla": {"treatment": n, "baseline": "vanilla", "gap": g} for n, g in
             (("myopic", _ci(0.02, 0.01, 0.03)), ("h4", _ci(0.005, 0.001, 0.01)), ("h1", _ci(0.01, 0.005, 0.02)),
              ("k2", _ci(0.0, -0.01, 0.01)), ("bigram", _ci(0.3, 0.2, 0.4)))}
    curves = {c["mode"]: c for c in horizon_curves(comps, cuts, 64)}
    assert set(curves) == {"myopic", "myopic_kv"}  # one curve per mode; bigram is no horizon cut
    myopic = curves["myopic"]
    assert [p["horizon"] for p in myopic["points"]] == [0, 1, 4]  # plain myopic stands in for w = 0
    assert myopic["smallest_horizon_including_zero"] is None and myopic["checks"] == {}
    assert curves["myopic_kv"]["smallest_horizon_including_zero"] == 2


def test_gap_vs_context_length(tmp_path, capsys):
    folder = write_word_corpus(tmp_path / "corpus", 40, 200)
    out = tmp_path / "ctx"
    common = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic",
              "--train.steps", "3", *FAST]
    assert cli.main([*common, "--out", str(out), "--context_lengths", "8,16"]) == 0
    results = json.loads((out / "results.json").read_text())
    entries = results["context_lengths"]
    assert list(entries) == ["8", "16"]
    assert [entries[T]["batch_size"] * int(T) for T in entries] == [128, 128]  # equal tokens per step
    assert entries["8"]["parameters"] == entries["16"]["parameters"]  # one model (context 16) for both
    for T in ("8", "16"):
        c = entries[T]["comparisons"]["myopic vs vanilla"]
        assert len(c["gap_by_relative_position"]) == 8
        sub = json.loads((out / f"T{T}" / "results.json").read_text())["config"]
        assert sub["data"]["seq_len"] == int(T) and sub["analysis"]["probe_train_windows"] == 16 * 16 // int(T)
    assert "# Gap vs context length" in (out / "report.md").read_text()
    assert (out / "gap_vs_context.png").is_file()
    capsys.readouterr()
    assert cli.main([*common, "--out", str(tmp_path / "bad"), "--context_lengths", "7,16"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_synthetic_horizon_grid(tmp_path):
    out = tmp_path / "syn"
    code = cli.main(["synthetic", "--preset", "tiny", "--out", str(out), "--control_arms", "", "--shifts", "1,2",
                     "--arms", "vanilla,myopic,myopic:h=0:name=h0,myopic:h=2:name=h2", "--train.steps", "4",
                     "--probe.train_sequences", "64", "--probe.test_sequences", "32", "--gradient_split_batches", "0"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["conditions"]) == ["shift1_p1", "shift2_p1"]
    assert results["conditions"]["shift2_p1"]["task"]["shift"] == 2
    grid = results["horizon_grid"]
    assert grid["shifts"] == [1, 2] and grid["arms"] == ["h0", "h2", "vanilla"] and grid["horizons"] == [0, 2, None]
    for key in ("ratio_to_trivial", "r2_layer1_fx"):
        assert len(grid[key]) == 2 and all(len(row) == 3 for row in grid[key])
    assert grid["ratio_to_trivial"][1][1] == results["summary"]["shift2_p1"]["h2"]["ratio_to_trivial"]
    assert "## Horizon × shift" in (out / "report.md").read_text()
    assert (out / "horizon_heatmap.png").is_file()


@pytest.mark.parametrize("command,preset", [("lm", p) for p in ("horizon-cpu", "layers-cpu", "context-cpu",
                                                                  "horizon-gpt2", "layers-gpt2", "context-gpt2")]
                         + [("synthetic", "horizon-cpu"), ("synthetic", "horizon-full")])
def test_new_presets_print_and_round_trip(command, preset, tmp_path, capsys):
    assert cli.main([command, "--preset", preset, "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    assert cli.main([command, "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    cfg = yaml.safe_load(text)
    assert cfg["seeds"] == ([0] if preset == "horizon-cpu" and command == "synthetic" else [0, 1, 2])
    if command == "synthetic" and preset == "horizon-full":  # the grid: s in {1, 2, 4} x w in {0, 1, 2, 4, 8}
        assert cfg["shifts"] == [1, 2, 4] and cfg["train"]["steps"] == 4000
        assert [Cut.parse(a).horizon for a in cfg["arms"][1:]] == [0, 1, 2, 4, 8] and cfg["arms"][0] == "vanilla"
    if command == "lm" and preset.startswith("horizon"):
        T = cfg["data"]["seq_len"]
        assert [Cut.parse(a).horizon for a in cfg["arms"][2:]] == [0, 1, 2, 4, 8, 16, 32, T - 1]
    if preset.startswith("context"):
        assert cfg["context_lengths"] == [64, 256, 1024] and cfg["model"]["block_size"] >= 1024
