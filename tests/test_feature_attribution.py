"""Per-feature attribution during training (myopia.runs.feature_attribution): the push towards a
feature's target values is the first-order decrease it claims, the monitor leaves training bit for bit
as it was, a myopic arm's pre-cached push is exactly zero at every step, and ``myopia synthetic``
writes the records, a summary (pushes integrated over the learning rate), a plot and the report's table,
which says "zero by construction" only where the arm's cut makes it so."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_attribution import _data, _gpt

from myopia import GPT, GPTConfig, cli
from myopia.analysis.attribution import feature_pushes, split_gradient
from myopia.experiments.synthetic.features import fx_probes
from myopia.runs import feature_attribution as fa
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.layout import metrics_path
from myopia.train.loop import MetricsLog, train_arm


def _ce(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none")


def test_push_towards_targets_is_the_first_order_decrease_of_the_squared_error():
    model, (x, y) = _gpt(), _data()
    layer, position = 1, 2
    split = split_gradient(model, x, y, _ce, layer, position)
    g = torch.Generator().manual_seed(3)
    w, t = torch.randn(8, dtype=torch.float64, generator=g), torch.randn(x.shape[0], dtype=torch.float64, generator=g)

    @torch.no_grad()
    def error():
        _, hidden = model(x, return_hidden_states=True)
        return 0.5 * float(((hidden[layer][:, position] @ w - t) ** 2).sum())

    pushes = feature_pushes(split, w, targets=t)
    assert pushes["direct"] + pushes["precached"] + pushes["shared"] == pytest.approx(
        -sum(float((a * b).sum()) for a, b in zip(split.feature_grad(w, t - split.values @ w), split.total())), rel=1e-10)
    for part in ("precached", "direct"):
        before = error()
        with torch.no_grad():
            for p, grad in zip(split.params, split.part(part)):
                p -= 1e-6 * grad
        after = error()
        with torch.no_grad():
            for p, grad in zip(split.params, split.part(part)):
                p += 1e-6 * grad
        assert (before - after) / 1e-6 == pytest.approx(pushes[part], rel=1e-4)
        assert abs(pushes[part]) > 1e-6  # a push that could be anything
    with pytest.raises(ValueError, match="one value per example"):
        feature_pushes(split, w, targets=t[:2])


def test_several_directions_scored_together_add_up():
    """A (d, k) read-out (a multi-class probe) pushes by the sum of its k columns' pushes."""
    model, (x, y) = _gpt(), _data()
    split = split_gradient(model, x, y, _ce, 0, 1)
    g = torch.Generator().manual_seed(4)
    W, t = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.randn(x.shape[0], 3, dtype=torch.float64, generator=g)
    together = feature_pushes(split, W, targets=t)
    for part in ("direct", "precached", "shared"):
        alone = sum(feature_pushes(split, W[:, j], targets=t[:, j])[part] for j in range(3))
        assert together[part] == pytest.approx(alone, rel=1e-10)
    assert feature_pushes(split, W)["direct"] == pytest.approx(sum(feature_pushes(split, W[:, j])["direct"]
                                                                   for j in range(3)), rel=1e-10)


def test_attribution_config_refuses_half_a_site():
    with pytest.raises(ValueError, match="both layers and positions"):
        fa.AttributionConfig(layers=[1])
    assert not fa.AttributionConfig().enabled


def _synthetic_run(tmp_path, attention, monitor):
    task_cfg = SyntheticConfig(seq_len=8, window=3)
    task = SyntheticTask(task_cfg, seed=0)
    train = TrainConfig(steps=9, batch_size=8, eval_every=4, checkpoint_every=0, log_every=1, progress=False)
    optim = OptimConfig(lr=3e-3)  # cosine decay: every step's learning rate differs
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, input_dim=2, output_dim=1,
                          dropout=0.2, attention=attention))
    watch = None
    if monitor:
        cfg = fa.AttributionConfig(layers=[1], positions=[2, 7], batch_size=4, probe_sequences=32)
        watch = fa.monitor(task, cfg, train, fx_probes(task_cfg, cfg, 1e-4, seed=0), optim=optim)
    arm_dir = str(tmp_path / attention / str(monitor))
    result = train_arm(model, task, optim, train, arm_dir=arm_dir, arm=attention, monitor=watch)
    return model, result, fa.read_trajectory(arm_dir)


def test_monitor_leaves_training_unchanged_and_a_myopic_arm_precaches_nothing(tmp_path):
    """With dropout on (any RNG use would show), the monitored run equals the unmonitored one bit for
    bit, in the vanilla arm and in the myopic one (whose cut the split switches and restores); it
    measures at 0, 1, 2, 4, 8 and the last step; the vanilla arm's pre-cached push is non-zero before
    the last position and zero at it, the myopic arm's is exactly zero everywhere."""
    plain, a, _ = _synthetic_run(tmp_path, "vanilla", monitor=False)
    watched, b, trajectory = _synthetic_run(tmp_path, "vanilla", monitor=True)
    assert [r["loss"] for r in a.history if "loss" in r] == [r["loss"] for r in b.history if "loss" in r]
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)
    assert [e["step"] for e in trajectory] == [0, 1, 2, 4, 8, 9]
    sites = [r for e in trajectory for r in e["sites"]]
    assert {(r["layer"], r["position"]) for r in sites} == {(1, 2), (1, 7)}
    assert any(abs(r["sgd"]["precached"]) > 0 for r in sites if r["position"] == 2)
    assert all(r["sgd"]["precached"] == 0 for r in sites if r["position"] == 7)  # the last position
    assert trajectory[0]["sites"][0]["adam"] is None and trajectory[-1]["sites"][0]["adam"] is not None
    plain, a, _ = _synthetic_run(tmp_path, "myopic", monitor=False)
    watched, b, myopic = _synthetic_run(tmp_path, "myopic", monitor=True)  # switched to vanilla and back at each split
    assert [r["loss"] for r in a.history if "loss" in r] == [r["loss"] for r in b.history if "loss" in r]
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)
    assert watched.attention_cut().spec == "myopic"
    assert all(r[kind]["precached"] == 0 for e in myopic for r in e["sites"] for kind in ("sgd", "adam") if r[kind])
    assert any(abs(r["sgd"]["direct"]) > 0 for e in myopic for r in e["sites"])


def test_synthetic_experiment_writes_the_attribution(tmp_path):
    out = tmp_path / "att"
    assert cli.main(["synthetic", "--preset", "tiny", "--control_arms", "", "--out", str(out), "--train.steps", "8",
                     "--seeds", "0,1", "--gradient_split_batches", "0", "--attribution.layers", "1",
                     "--attribution.positions", "3,15", "--attribution.batch_size", "8",
                     "--attribution.probe_sequences", "64"]) == 0
    results = json.loads((out / "results.json").read_text())
    att = results["feature_attribution"]
    assert set(att["runs"]) == {"shift1_p1 vanilla", "shift1_p1 myopic"}
    summary = att["summary"]["shift1_p1 myopic"]["layer 1 position 3 f(x_t)"]
    assert summary["integral"]["precached"] == 0 and summary["integral"]["direct"] != 0
    assert summary["precached_zero_by_construction"]
    vanilla = att["summary"]["shift1_p1 vanilla"]["layer 1 position 3 f(x_t)"]
    assert vanilla["integral"]["precached"] != 0 and not vanilla["precached_zero_by_construction"]
    assert (out / "feature_attribution.png").exists()
    assert "| shift1_p1 vanilla | 1 | 3 | f(x_t) |" in (out / "report.md").read_text()
    assert fa.read_trajectory(str(out / "seed0" / "shift1_p1" / "vanilla"))  # the first seed only is measured
    assert not fa.read_trajectory(str(out / "seed1" / "shift1_p1" / "vanilla"))


def test_synthetic_refuses_a_site_the_model_does_not_have(tmp_path, capsys):
    assert cli.main(["synthetic", "--preset", "tiny", "--out", str(tmp_path / "x"), "--attribution.layers", "2",
                     "--attribution.positions", "3"]) != 0
    assert "attribution.layers" in capsys.readouterr().err


@pytest.mark.parametrize("model", [[], ["--hf_model", "llama-tiny"]], ids=["gpt", "llama-tiny"])
def test_lm_experiment_scores_future_token_probes(tmp_path, model):
    """``myopia lm --attribution...`` splits each arm's gradient at the start and end of training and
    scores the future-token probes (t+1, t+2; none where t+k is past the window); the myopic arm's
    pre-cached push is exactly zero; the report ranks the layers."""
    out = tmp_path / "lm"
    assert cli.main(["lm", "--preset", "tiny", "--arms", "vanilla,myopic", "--out", str(out), *model,
                     "--train.steps", "2", "--analysis.probe_offsets", "1,2", "--attribution.layers", "0,1",
                     "--attribution.positions", "3,15", "--attribution.batch_size", "4",
                     "--attribution.probe_sequences", "32"]) == 0
    att = json.loads((out / "results.json").read_text())["feature_attribution"]
    vanilla, myopic = att["runs"]["seed 0 vanilla"], att["runs"]["seed 0 myopic"]
    assert [e["step"] for e in vanilla] == [0, 1, 2]
    sites = {(r["layer"], r["position"], r["feature"]) for r in vanilla[0]["sites"]}
    assert (1, 15, "token t+1") in sites and (1, 15, "token t+2") not in sites  # t+2 = 17 > T = 16
    assert all(0 <= r["probe"]["accuracy"] <= 1 for r in vanilla[0]["sites"])
    assert any(r["sgd"]["precached"] != 0 for r in vanilla[0]["sites"] if r["position"] == 3)
    assert all(r["sgd"]["precached"] == 0 for e in myopic for r in e["sites"])
    report = (out / "report.md").read_text()
    assert "## Per-feature attribution by layer: seed 0 vanilla, step 0" in report
    assert (out / "feature_attribution_layers.png").exists()


@pytest.mark.parametrize("bad,named", [
    (["--attribution.layers", "2", "--attribution.positions", "3"], "attribution.layers"),
    (["--attribution.layers", "0", "--attribution.positions", "16"], "attribution.positions"),
    (["--attribution.layers", "0", "--attribution.positions", "3", "--analysis.probe_offsets", "16"], "probe_offsets"),
], ids=["layer", "position", "no-probe"])
def test_lm_refuses_a_site_or_probe_it_does_not_have_before_training(tmp_path, capsys, bad, named):
    out = tmp_path / "x"
    assert cli.main(["lm", "--preset", "tiny", "--arms", "vanilla", "--out", str(out), "--train.steps", "1",
                     "--analysis.probe_offsets", "1", *bad]) != 0
    assert named in capsys.readouterr().err
    assert not (out / "pretrain").exists() and not (out / "seed0").exists()


def test_the_summary_integrates_the_pushes_over_the_learning_rate_and_steps(tmp_path):
    """Each measurement's push counts with the learning rate summed over the updates until the next
    measurement (0 after the last): the sum of the ``lr`` the training loop logged for those updates,
    so that the summary approximates the integral of the change over training, not a sum over
    log-spaced measurements."""
    _, _, trajectory = _synthetic_run(tmp_path, "vanilla", monitor=True)
    logged = {r["step"]: r["lr"] for r in MetricsLog(metrics_path(str(tmp_path / "vanilla" / "True")),
                                                           enabled=False).read() if "lr" in r}
    steps = [e["step"] for e in trajectory]
    assert steps == [0, 1, 2, 4, 8, 9]
    for e, following in zip(trajectory, steps[1:] + [steps[-1]]):
        # the update from step u to u + 1 is logged at step u + 1
        assert e["lr_until_next"] == pytest.approx(sum(logged[u + 1] for u in range(e["step"], following)), rel=1e-12)
    assert trajectory[-1]["lr_until_next"] == 0 and len(set(logged.values())) > 2
    summary = fa.summarise(trajectory)["layer 1 position 2 f(x_t)"]
    for part in ("direct", "precached", "shared"):
        want = sum(r["sgd"][part] * e["lr_until_next"] for e in trajectory for r in e["sites"] if r["position"] == 2)
        assert summary["integral"][part] == pytest.approx(want, rel=1e-12)
    assert summary["integral"]["precached"] != pytest.approx(
        sum(r["sgd"]["precached"] for e in trajectory for r in e["sites"] if r["position"] == 2), rel=1e-3)


@pytest.mark.parametrize("arm,claimed", [("myopic", True), ("myopic_kv", True), ("myopic@0.5", False),
                                         ("myopic:h=1", False), ("myopic:layers=0", False), ("vanilla", False)])
def test_the_report_says_zero_by_construction_only_where_the_cut_makes_it_so(arm, claimed):
    """A myopic@β arm keeps part of the crossing gradient, a horizon keeps the edges within it and a
    cut in block 0 only leaves block 1 vanilla: their pre-cached part at layer 1 is measured, and the
    report claims nothing for them."""
    task_cfg = SyntheticConfig(seq_len=8, window=3)
    task = SyntheticTask(task_cfg, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, input_dim=2, output_dim=1, attention=arm))
    cfg = fa.AttributionConfig(layers=[1], positions=[2], batch_size=4, probe_sequences=32)
    records = fa.measure(model, task, cfg, fx_probes(task_cfg, cfg, 1e-4, seed=0))
    trajectory = [{"step": 0, "sites": records, "lr_until_next": 1e-3}]
    report = "\n".join(fa.report_lines({"runs": {arm: trajectory}, "summary": {arm: fa.summarise(trajectory)}}))
    assert ("by construction" in report) is claimed
    assert f"| {arm} | 1 | 2 | f(x_t) | " in report
    assert ("| 0 (by construction) |" in report) is claimed
    assert [r["precached_zero_by_construction"] for r in records] == [claimed]
    assert (records[0]["sgd"]["precached"] == 0) is claimed


def test_the_docs_state_the_correspondence_with_rofin_et_al():
    """docs/attribution.md says which of our cuts their myopic baseline is (detached past keys and
    values: ``myopic_kv``) and contrasts their fixed final-model probe with our refitted ones."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "attribution.md").read_text()
    section = text.split("## Correspondence with Rofin et al.", 1)[1].split("\n## ", 1)[0]
    assert "keys and values" in section and "our `myopic_kv`" in section
    assert "final model" in section and "refit" in section and "what" in section
