"""The language-modelling experiment end to end on a small local corpus, and its statistics."""

import json

import pytest
import torch
from conftest import write_word_corpus

from myopia import GPT, GPTConfig, cli
from myopia.local_myopia import LocalMyopicGPT


def test_lm_experiment_end_to_end(tmp_path):
    folder = write_word_corpus(tmp_path / "corpus", 60, 300)
    out = tmp_path / "run"
    code = cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--out", str(out),
                     "--arms", "vanilla,myopic,bigram,local-myopic"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"vanilla", "myopic", "bigram", "local-myopic"}
    bonus = results["local_myopia_bonus"]
    assert bonus["low"] <= bonus["mean"] <= bonus["high"]
    gap = results["myopia_gap"]
    assert gap["low"] <= gap["mean"] <= gap["high"] and gap["clusters"] > 1
    assert len(results["gap_per_position"]) == 16
    assert len(results["top_kl"]) == 5 and results["top_kl"][0]["kl"] >= results["top_kl"][-1]["kl"]
    assert len(results["probes"]["vanilla"]) == 3  # embeddings + 2 blocks
    report = (out / "report.md").read_text()
    assert "Myopia gap" in report and "3.28" in report and "Local myopia bonus" in report


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
