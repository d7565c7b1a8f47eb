"""The language-modelling experiment end to end on a small local corpus, and its statistics."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import write_word_corpus

from myopia import GPT, GPTConfig, cli
from myopia.models.local import LocalMyopicGPT


def test_lm_experiment_end_to_end(tmp_path):
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    out = tmp_path / "run"
    code = cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out),
                     "--arms", "vanilla,myopic,bigram,local-myopic"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "lm" and results["status"] == "completed"
    assert set(results["arms"]) == {"vanilla", "myopic", "bigram", "local-myopic"}
    bonus = results["local_myopia_bonus"]
    assert bonus["low"] <= bonus["mean"] <= bonus["high"]
    # every arm against vanilla; local-myopic's comparison is the bonus
    assert list(results["comparisons"]) == ["myopic vs vanilla", "bigram vs vanilla"]
    paper = results["comparisons"]["myopic vs vanilla"]
    gap = paper["gap"]
    assert gap["low"] <= gap["mean"] <= gap["high"] and gap["clusters"] > 1
    assert len(paper["gap_per_position"]) == 16
    assert len(paper["top_kl"]) == 5 and paper["top_kl"][0]["kl"] >= paper["top_kl"][-1]["kl"]
    assert len(results["probes"]["vanilla"]) == 3  # embeddings + 2 blocks
    assert "bigram" not in results["probes"]  # its state at t sees token t only
    bigram = results["comparisons"]["bigram vs vanilla"]
    assert bigram["gap"]["mean"] > 0 and len(bigram["top_kl"]) == 5
    first = paper["first_position_gap"]
    assert first["low"] <= first["mean"] <= first["high"] and first["n"] > 16 * results["heldout"]["windows"] // 16
    assert results["ci_over"] == "documents" and list(results["per_seed"]) == ["0"]
    report = (out / "report.md").read_text()
    assert "Myopia gap" in report and "3.28" in report and "Local myopia bonus" in report
    assert "| bigram − vanilla |" in report and "KL(vanilla ‖ bigram)" in report
    assert "run-to-run variance is not included" in report
    geometry = results["gradient_geometry"]["runs"]  # measured in the arms whose forward is vanilla's
    assert set(geometry) == {"seed 0 vanilla", "seed 0 myopic"}
    assert [r["step"] for r in geometry["seed 0 vanilla"]] == [0, 1, 2, 4, 8, 16, 30]
    assert all(r["future_norm"] > 0 for r in geometry["seed 0 myopic"])
    assert "## Gradient geometry" in report and (out / "gradient_geometry.png").is_file()


def test_lm_several_seeds_give_intervals_over_seeds(tmp_path):
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    out = tmp_path / "run"
    code = cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out),
                     "--arms", "vanilla,myopic", "--seeds", "3,4", "--train.steps", "10"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3, 4] and results["ci_over"] == "seeds"
    per_seed = [results["per_seed"][s]["comparisons"]["myopic vs vanilla"]["gap"]["mean"] for s in ("3", "4")]
    assert per_seed[0] != per_seed[1]  # different initial weights and data order
    gap = results["comparisons"]["myopic vs vanilla"]["gap"]
    assert gap["n"] == 2 and gap["mean"] == pytest.approx(sum(per_seed) / 2)
    assert gap["low"] < gap["mean"] < gap["high"]
    assert (out / "seed3" / "vanilla").is_dir() and (out / "seed4" / "myopic").is_dir()
    assert "## Per seed" in (out / "report.md").read_text()
    code = cli.main(["lm", "--preset", "tiny", "--seeds", "1,1", "--out", str(tmp_path / "bad")])
    assert code == 2


@pytest.mark.parametrize("family", ["ours", "hf"])
def test_one_token_contexts_give_the_windows_position_0_losses(tmp_path, family):
    """The position-0 gap over all held-out tokens rests on this: position 0 sees only its own token."""
    from myopia.experiments.lm.analysis import first_position_losses
    from myopia.models.hf.presets import build_hf_model
    from myopia.tasks.text import TextConfig, TextTask

    folder = write_word_corpus(tmp_path / "corpus", 40, 200)
    task = TextTask(TextConfig(corpus=str(folder), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "c")), 0,
                    log=lambda *a: None)
    torch.manual_seed(0)
    if family == "ours":
        model = GPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=16, block_size=16))
    else:
        model = build_hf_model("llama-tiny", "vanilla", task.tokenizer.vocab_size, 0)
    model.eval()
    losses, docs = first_position_losses(task, {"m": model}, torch.device("cpu"), 0)
    off = task.heldout.doc_offsets
    assert len(losses["m"]) == len(docs) == int((off[1:] - off[:-1] - 1).clip(min=0).sum())
    x, y, doc = next(task.heldout_all(8))
    with torch.no_grad():
        window_pos0 = torch.nn.functional.cross_entropy(model(x)[:, 0], y[:, 0], reduction="none")
    pairs_before = np.concatenate([[0], np.cumsum((off[1:] - off[:-1] - 1).clip(min=0))])
    starts = task.scored_windows()[:8, 0]
    index = [int(pairs_before[d] + s - off[d]) for s, d in zip(starts, doc.tolist())]
    torch.testing.assert_close(torch.from_numpy(losses["m"][index]).float(), window_pos0, rtol=1e-5, atol=1e-5)


def test_every_arm_is_compared_with_vanilla_or_as_the_pairs_say(tmp_path, capsys):
    """New arm kinds (horizon, per-layer cuts) get a gap, KL tokens and probes against vanilla by
    default; --analysis.pairs picks other pairs; a pair naming an arm that is not trained is a
    one-line error naming the option and the fix."""
    folder = write_word_corpus(tmp_path / "corpus", 40, 200)
    common = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic,myopic:h=2,myopic:layers=0",
              "--train.steps", "3", "--analysis.heldout_windows", "16", "--analysis.bootstrap", "20",
              "--analysis.probe_train_windows", "16", "--analysis.probe_classes", "8", "--analysis.top_kl", "2",
              "--analysis.first_position_tokens", "50", "--analysis.gradient_split_batches", "0"]
    out = tmp_path / "default"
    assert cli.main([*common, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    treatments = ["myopic", "myopic:h=2", "myopic:layers=0"]
    assert list(results["comparisons"]) == [f"{t} vs vanilla" for t in treatments]
    for t in treatments:
        c = results["comparisons"][f"{t} vs vanilla"]
        assert (c["treatment"], c["baseline"]) == (t, "vanilla")
        assert c["gap"]["mean"] == pytest.approx(results["arms"][t]["loss"]["mean"]
                                                 - results["arms"]["vanilla"]["loss"]["mean"], abs=1e-9)
        assert len(c["gap_per_position"]) == 16 and len(c["top_kl"]) == 2 and c["first_position_gap"]["n"] == 50
        assert len(results["probes"][t]) == 3
    report = (out / "report.md").read_text()
    assert all(f"| {t} − vanilla |" in report for t in treatments) and "KL(vanilla ‖ myopic:layers=0)" in report
    out = tmp_path / "pairs"
    assert cli.main([*common, "--out", str(out), "--analysis.pairs", "myopic:h=2/myopic,myopic/vanilla"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["comparisons"]) == ["myopic:h=2 vs myopic", "myopic vs vanilla"]
    assert set(results["probes"]) >= {"myopic:h=2", "myopic", "vanilla"} and "myopic:layers=0" not in results["probes"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert cli.main([*common, "--out", str(bad), "--analysis.pairs", "myopic:h=8/vanilla"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "analysis.pairs" in err and "'myopic:h=8'" in err and "--arms" in err
    assert os.listdir(bad) == ["attempts.jsonl"]  # refused before anything ran; the attempt is on record
    ended = [json.loads(x) for x in (bad / "attempts.jsonl").read_text().splitlines()][-1]
    assert ended["outcome"] == "failed" and ended["exit_code"] == 2 and "analysis.pairs" in ended["error"]


def test_local_myopic_arm_needs_vanilla_first(tmp_path, capsys):
    code = cli.main(["lm", "--preset", "tiny", "--arms", "local-myopic,vanilla", "--out", str(tmp_path / "r")])
    assert code == 2 and "list vanilla before it" in capsys.readouterr().err
    code = cli.main(["synthetic", "--preset", "tiny", "--arms", "vanilla,local-myopic", "--out", str(tmp_path / "s")])
    assert code == 2 and "local-myopic" in capsys.readouterr().err


def _gpt(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("n_layer", 3)
    cfg = GPTConfig(vocab_size=29, n_head=4, n_kv_head=2, n_embd=16, block_size=12, **kw)
    return GPT(cfg).double()


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_local_myopic_with_equal_weights_reproduces_the_frozen_model(position):
    frozen = _gpt(position=position)
    local = LocalMyopicGPT(frozen)
    x = torch.randint(0, 29, (3, 12))
    torch.testing.assert_close(local(x), frozen(x), rtol=1e-12, atol=1e-12)
    # ... and with other weights it reads the frozen model's past, not its own
    other = LocalMyopicGPT(frozen, _gpt(seed=1, position=position))
    assert not torch.allclose(other(x), other.model(x))
    # the first position has no past: it is the trained model's own
    torch.testing.assert_close(other(x)[:, 0], other.model(x)[:, 0], rtol=1e-12, atol=1e-12)


def test_local_myopic_trains_only_its_own_model():
    local = LocalMyopicGPT(_gpt())
    x = torch.randint(0, 29, (2, 12))
    local.train()
    assert not local.frozen.training
    local(x).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in local.frozen.parameters())
    assert all(p.grad is not None for p in local.model.parameters())


def test_local_myopic_past_goes_through_the_layers_own_norm():
    """The past is read through the trained model's pre-attention LayerNorm, which is blind to the
    scale of the frozen states: scaling the frozen model's embeddings (the past of block 0 in a
    1-block model) must not change the output. The paper's code projected the past un-normalised,
    which would change it."""
    x = torch.randint(0, 29, (2, 12))
    frozen = _gpt(n_layer=1, layer_norm_eps=1e-12)
    trained = _gpt(seed=1, n_layer=1, layer_norm_eps=1e-12)
    before = LocalMyopicGPT(frozen, trained)(x)
    with torch.no_grad():
        frozen.wte.weight.mul_(5.0)
        frozen.wpe.weight.mul_(5.0)
    after = LocalMyopicGPT(frozen, trained)(x)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_top_kl_tokens_are_the_largest(tmp_path):
    """The reported top-KL tokens are exactly the largest KL(vanilla || myopic) over every held-out
    position (checked by brute force), and top_kl = 0 turns the search off."""
    from myopia.experiments.lm.analysis import analyse
    from myopia.experiments.lm.config import LMExperiment
    from myopia.tasks.text import TextConfig, TextTask

    folder = write_word_corpus(tmp_path / "corpus", 40, 200)
    data = TextConfig(corpus=str(folder), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "c"))
    task = TextTask(data, 0, log=lambda *a: None)
    models = {}
    for i, name in enumerate(("vanilla", "myopic")):
        torch.manual_seed(i)
        models[name] = GPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                     block_size=16)).eval()
    cfg = LMExperiment(data=data)
    cfg.analysis.top_kl, cfg.analysis.probe_train_windows, cfg.analysis.first_position_tokens = 4, 16, -1
    cfg.analysis.top_kl_windows = 0  # every analysis window (the default searches 64 of them)
    top = analyse(cfg.analysis, task, models, torch.device("cpu"))["comparisons"]["myopic vs vanilla"]["top_kl"]
    kls = []
    with torch.no_grad():
        for x, _, _ in task.heldout_all(64):
            lv, lm = (torch.log_softmax(models[n](x), -1) for n in ("vanilla", "myopic"))
            kls.append((lv.exp() * (lv - lm)).sum(-1))
    kl = torch.cat(kls)
    best = kl.flatten().topk(4)
    assert [r["kl"] for r in top] == pytest.approx(best.values.tolist(), rel=1e-5)
    for r in top:  # (ties between identical contexts make the positions themselves ambiguous)
        assert float(kl[r["window"], r["position"]]) == pytest.approx(r["kl"], rel=1e-5)
    cfg.analysis.top_kl = 0
    assert analyse(cfg.analysis, task, models, torch.device("cpu"))["comparisons"]["myopic vs vanilla"]["top_kl"] == []


def _latest_weights(arm_dir):
    from myopia.train.checkpoint import latest_checkpoint, read_checkpoint

    return read_checkpoint(latest_checkpoint(str(arm_dir / "checkpoints")))[0]


@pytest.mark.parametrize("family", ["ours", "hf"])
def test_arms_fine_tune_one_pretrained_model(tmp_path, capsys, family):
    """pretrain.steps trains one vanilla model first and every arm of every seed starts from it;
    init_from starts them from a given checkpoint. With a negligible fine-tuning learning rate each
    arm ends where its starting model was, and far from a fresh initialisation."""
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    common = ["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic,bigram",
              "--train.steps", "2", "--optim.lr", "1e-9"]
    if family == "hf":
        common += ["--hf_model", "llama-tiny"]
    out = tmp_path / "run"
    assert cli.main([*common, "--out", str(out), "--seeds", "0,1", "--pretrain.steps", "20",
                     "--pretrain.lr", "3e-3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pretraining"]["status"] == "completed" and results["pretraining"]["steps"] == 20
    assert "pretrained for 20 steps (lr 0.003, seed 1000)" in (out / "report.md").read_text()
    # two seeds from one shared start: the intervals say they leave out the variance of pretraining
    assert results["start"] == {"kind": "pretrained_shared", "conditional_on_one_start": True}
    assert "conditional on one starting model" in (out / "report.md").read_text()
    start = _latest_weights(out / "pretrain" / "vanilla")
    for seed in (0, 1):
        for arm in ("vanilla", "myopic", "bigram"):
            weights = _latest_weights(out / f"seed{seed}" / arm)
            assert weights.keys() == start.keys()
            for name, w in start.items():
                torch.testing.assert_close(weights[name], w, atol=1e-6, rtol=0)
    capsys.readouterr()
    pretrained = str(out / "pretrain" / "vanilla")
    if family == "hf":
        assert cli.main([*common, "--out", str(tmp_path / "x"), "--init_from", pretrained]) == 2
        assert "checkpoint directory as --hf_model" in capsys.readouterr().err
        return
    fresh = GPT(GPTConfig(vocab_size=start["wte.weight"].shape[0], n_layer=2, n_head=2, n_embd=32, block_size=16))
    assert (start["blocks.0.attn.c_attn.weight"] - fresh.state_dict()["blocks.0.attn.c_attn.weight"]).abs().max() > 1e-3
    again = tmp_path / "again"
    assert cli.main([*common, "--out", str(again), "--init_from", pretrained]) == 0
    torch.testing.assert_close(_latest_weights(again / "seed0" / "myopic")["blocks.1.mlp.c_proj.weight"],
                               start["blocks.1.mlp.c_proj.weight"], atol=1e-6, rtol=0)
    capsys.readouterr()
    assert cli.main([*common, "--out", str(tmp_path / "x"), "--init_from", pretrained, "--pretrain.steps", "5"]) == 2
    assert "set only one" in capsys.readouterr().err
