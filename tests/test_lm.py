"""The language-modelling experiment end to end on a small local corpus, and its statistics."""

import json

import numpy as np

from myopia import cli
from myopia.analysis.stats import bootstrap_ci, cluster_bootstrap_ci


def test_lm_experiment_end_to_end(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat log and then it was very quite big small".split()
    for i in range(60):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=300)) + ".")
    out = tmp_path / "run"
    code = cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"vanilla", "myopic", "bigram"}
    gap = results["myopia_gap"]
    assert gap["low"] <= gap["mean"] <= gap["high"] and gap["clusters"] > 1
    assert len(results["gap_per_position"]) == 16
    assert len(results["top_kl"]) == 5 and results["top_kl"][0]["kl"] >= results["top_kl"][-1]["kl"]
    assert len(results["probes"]["vanilla"]) == 3  # embeddings + 2 blocks
    report = (out / "report.md").read_text()
    assert "Myopia gap" in report and "3.28" in report


def test_bootstrap_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    hits, hits_cluster, trials = 0, 0, 200
    for t in range(trials):
        x = rng.exponential(1.0, size=60)  # true mean 1
        ci = bootstrap_ci(x, n_boot=400, seed=t)
        hits += ci["low"] <= 1.0 <= ci["high"]
        # clustered data: 30 documents with their own offsets, 5 windows each; true mean 0
        offsets = rng.normal(0, 1, size=30)
        values = np.repeat(offsets, 5) + rng.normal(0, 0.5, size=150)
        ci = cluster_bootstrap_ci(values, np.repeat(np.arange(30), 5), n_boot=400, seed=t)
        hits_cluster += ci["low"] <= 0.0 <= ci["high"]
    assert 0.88 <= hits / trials <= 0.99
    assert 0.88 <= hits_cluster / trials <= 0.99
