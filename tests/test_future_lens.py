"""Future-token decodability (myopia.analysis.future_lens): the decoder is the model's own unembedding
path (the map from the final state to itself at k = 0 reproduces the model's own next-token accuracy
exactly), the closed-form ridge is least squares, the skip-bigram counts successors, and the results
carry intervals and paired differences."""

import numpy as np
import pytest
import torch
from conftest import write_word_corpus

from myopia import GPT, GPTConfig
from myopia.analysis import future_lens as fl
from myopia.tasks.text import TextConfig, TextTask


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fl")
    folder = write_word_corpus(tmp / "corpus", 40, 200)
    return TextTask(TextConfig(corpus=str(folder), vocab_size=300, seq_len=16, cache_dir=str(tmp / "c")), 0,
                    log=lambda *a: None)


def _model(task, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=16,
                         block_size=16)).double().eval()


def test_the_final_state_mapped_to_itself_at_k0_is_the_models_own_prediction(task):
    model = _model(task)
    cfg = fl.FutureLensConfig(layers=[fl.FINAL, 1], offsets=[0, 2], fit_tokens=2000, score_tokens=600,
                              ridges=[0.0, 1.0], bootstrap=50)
    result = fl.future_lens(model, task, cfg, keep_positions=True)
    scored = result["positions_scored"]
    own = result["ceiling"]["0"]["top1"]["mean"]
    final = result["maps"][str(fl.FINAL)]["0"]
    assert result["ridge"][str(fl.FINAL)]["0"] == 0.0  # the identity: no shrinkage wins on held-back data
    assert final["top1"]["mean"] == own  # exactly: the decoder is the model's own head
    assert np.array_equal(scored[("map", fl.FINAL, 0, "top1")], scored[("ceiling", 0, "top1")])
    assert final["agree"]["mean"] == 1.0
    # and the ceiling is the model's own next-token accuracy, computed here from its logits
    x, y, _ = next(task.heldout_all(1000, -(-600 // 14)))
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).double().mean().item()
    assert own == pytest.approx(acc, abs=1e-12)
    # a real map: the block-1 stream two tokens ahead is worse than the ceiling there, with intervals
    m = result["maps"]["1"]["2"]["top1"]
    assert m["low"] <= m["mean"] <= m["high"]
    assert 0 <= m["mean"] <= 1 and result["skip_bigram"]["2"]["top5"]["mean"] >= result["skip_bigram"]["2"]["top1"]["mean"]


def test_the_closed_form_is_least_squares():
    torch.manual_seed(0)
    h = torch.randn(500, 6, dtype=torch.float64)
    z = h @ torch.randn(6, 4, dtype=torch.float64) + 0.3 + 0.01 * torch.randn(500, 4, dtype=torch.float64)
    fit, held = fl.ProbeStats(6, 4), fl.ProbeStats(6, 4)
    fit.add(h[:400], z[:400])
    held.add(h[400:], z[400:])
    lens = fl._solve(fit, held, [0.0])
    design = torch.cat([h, torch.ones(500, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, z).solution
    assert torch.allclose(lens(h), design @ coef, atol=1e-9)
    # a ridge that held-back data prefers is chosen: pure noise targets want the largest strength
    noise = torch.randn(500, 4, dtype=torch.float64)
    fit, held = fl.ProbeStats(6, 4), fl.ProbeStats(6, 4)
    fit.add(h[:50], noise[:50])
    held.add(h[50:], noise[50:])
    assert fl._solve(fit, held, [0.0, 1e-2, 100.0]).ridge == 100.0


def test_skip_bigram_counts_successors_within_documents(task):
    tables = fl.skip_bigram(task, [0, 1])
    tokens = np.asarray(task.train.tokens, dtype=np.int64)
    off = np.asarray(task.train.doc_offsets)
    doc = np.searchsorted(off, np.arange(len(tokens)), side="right") - 1
    t = int(tokens[5])
    for k in (0, 1):
        d = k + 1
        idx = np.flatnonzero((tokens[:-d] == t) & (doc[:-d] == doc[d:]))
        counts = np.bincount(tokens[idx + d], minlength=task.tokenizer.vocab_size)
        assert counts[tables[k][t, 0]] == counts.max()
        assert sorted(counts[tables[k][t]].tolist(), reverse=True) == sorted(counts, reverse=True)[:5]


def test_paired_differences_are_over_the_same_positions(task):
    cfg = fl.FutureLensConfig(layers=[0, 2], offsets=[1], fit_tokens=1000, score_tokens=300, bootstrap=50)
    a = fl.future_lens(_model(task, 0), task, cfg, keep_positions=True)
    b = fl.future_lens(_model(task, 1), task, cfg, keep_positions=True)
    diff = fl.paired_difference(a, b, cfg)
    for l in ("0", "2"):
        assert diff[l]["1"]["mean"] == pytest.approx(a["maps"][l]["1"]["top1"]["mean"] - b["maps"][l]["1"]["top1"]["mean"])
    assert fl.paired_difference(a, a, cfg)["2"]["1"]["mean"] == 0.0
    # results scored on other positions are refused, never paired position by position
    fewer = fl.future_lens(_model(task, 1), task, fl.FutureLensConfig(layers=[0, 2], offsets=[1], fit_tokens=1000,
                                                                       score_tokens=150, bootstrap=50), keep_positions=True)
    with pytest.raises(ValueError, match="different held-out positions"):
        fl.paired_difference(a, fewer, cfg)
    shifted = {**b, "positions_scored": {**b["positions_scored"],
                                         ("tokens", 1): np.roll(b["positions_scored"][("tokens", 1)], 1)}}
    with pytest.raises(ValueError, match="different held-out positions"):
        fl.paired_difference(a, shifted, cfg)
    with pytest.raises(ValueError, match="no maps"):
        fl.paired_difference(a, {**b, "layers": [0]}, cfg)


def test_default_layers():
    assert fl.default_layers(2) == [0, 1, 2]
    assert fl.default_layers(30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]


def test_lm_reports_the_future_lens_of_the_start_and_the_arms(tmp_path):
    import json

    from myopia import cli

    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    out = tmp_path / "run"
    args = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic,bigram",
            "--pretrain.steps", "10", "--train.steps", "6", "--future_lens.enabled", "true",
            "--future_lens.fit_tokens", "2000", "--future_lens.score_tokens", "500", "--future_lens.bootstrap", "50",
            "--out", str(out)]
    assert cli.main(args) == 0
    lens = json.loads((out / "results.json").read_text())["future_lens"]
    assert set(lens["models"]) == {"start", "vanilla", "myopic"}  # bigram's states see one token: no lens
    assert lens["models"]["myopic"]["layers"] == [0, 1, 2] and lens["models"]["myopic"]["offsets"] == [1, 2, 3]
    assert set(lens["differences"]) == {"myopic - vanilla", "vanilla - start", "myopic - start"}
    d = lens["differences"]["myopic - vanilla"]["1"]["2"]
    m, v = (lens["models"][n]["maps"]["1"]["2"]["top1"]["mean"] for n in ("myopic", "vanilla"))
    assert d["mean"] == pytest.approx(m - v)
    report = (out / "report.md").read_text()
    assert "Future-token decodability" in report and "skip-bigram" in report and (out / "future_lens.png").exists()
    assert (out / "seed0" / "myopic" / "future_lens.npz").exists() and (out / "future_lens_start.npz").exists()


def test_lm_measures_the_arms_of_several_seeds_and_gives_intervals_over_them(tmp_path, capsys):
    """``--future_lens.seeds``: each named seed's arms get their own lens; the first seed's stay the top-level
    figures, and the arms' accuracies and paired differences get t-intervals over the seeds. A resume that
    adds seeds keeps the lenses already measured; a seed the run does not train is refused in one line."""
    import json

    from myopia import cli
    from myopia.analysis.stats import mean_ci

    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    out = tmp_path / "run"
    args = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic", "--seeds", "1,0",
            "--pretrain.steps", "10", "--train.steps", "4", "--optim.lr", "3e-2", "--future_lens.enabled", "true",
            "--future_lens.fit_tokens", "1000", "--future_lens.score_tokens", "300", "--future_lens.bootstrap", "20",
            "--out", str(out)]
    assert cli.main(args + ["--future_lens.seeds", "5"]) == 2
    assert "future_lens.seeds=[5]" in capsys.readouterr().err
    off = [a if a != "true" else "false" for a in args]  # seeds named with the lens off
    assert cli.main(off + ["--future_lens.seeds", "0"]) == 2
    assert "--future_lens.enabled true" in capsys.readouterr().err
    assert cli.main(args) == 0
    one = json.loads((out / "results.json").read_text())["future_lens"]
    assert one["seeds"] == [1] and "over_seeds" not in one  # the run's first seed
    first_lens = (out / "seed1" / "myopic" / "future_lens.npz").stat().st_mtime_ns
    assert cli.main(args + ["--future_lens.seeds", "0,1", "--resume"]) == 0
    assert (out / "seed1" / "myopic" / "future_lens.npz").stat().st_mtime_ns == first_lens  # kept, not re-measured
    lens = json.loads((out / "results.json").read_text())["future_lens"]
    assert lens["seeds"] == [1, 0] and set(lens["per_seed"]) == {"0", "1"}  # in the run's order
    assert lens["models"] == one["models"] and lens["per_seed"]["1"]["models"] == one["models"]
    assert set(lens["per_seed"]["0"]["models"]) == {"start", "vanilla", "myopic"}
    assert set(lens["over_seeds"]["differences"]) == {"myopic - vanilla", "vanilla - start", "myopic - start"}
    per = [lens["per_seed"][s]["differences"]["vanilla - start"]["1"]["1"]["mean"] for s in ("0", "1")]
    assert per[0] != per[1]  # each seed's own arms
    assert lens["over_seeds"]["differences"]["vanilla - start"]["1"]["1"] == pytest.approx(mean_ci(per))
    acc = [lens["per_seed"][s]["models"]["vanilla"]["maps"]["2"]["1"]["top1"]["mean"] for s in ("0", "1")]
    assert lens["over_seeds"]["models"]["vanilla"]["maps"]["2"]["1"]["top1"] == pytest.approx(mean_ci(acc))
    assert "start" not in lens["over_seeds"]["models"]
    assert "Over seeds 1, 0" in (out / "report.md").read_text() and (out / "future_lens.png").exists()
