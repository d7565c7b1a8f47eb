"""Hugging Face models as experiment arms: presets build and train offline, local checkpoints load,
and `myopia sweep` gathers the gap across sizes."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from conftest import write_word_corpus

from myopia import cli
from myopia.config import ConfigError
from myopia.models.hf.myopic import current_cut
from myopia.models.hf.presets import HF_PRESETS, build_hf_model


@pytest.mark.parametrize("name", ["gpt2-124m", "pythia-14m", "llama-tiny"])
def test_preset_builds_and_trains_a_step_offline(name):
    model = build_hf_model(name, "myopic", vocab_size=50257, seed=0)
    assert current_cut(model.hf).spec == "myopic"
    x = torch.randint(0, 50257, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _, hidden = model(x, return_hidden_states=True)
    assert len(hidden) == model.config.num_hidden_layers + 1


def test_pythia_presets_have_the_published_shapes_and_learning_rates():
    shapes = {n: (p.config["hidden_size"], p.config["num_hidden_layers"], p.lr) for n, p in HF_PRESETS.items()
              if n.startswith("pythia")}
    assert shapes["pythia-70m"] == (512, 6, 1e-3)
    assert shapes["pythia-410m"] == (1024, 24, 3e-4)
    assert shapes["pythia-2.8b"] == (2560, 32, 1.6e-4)
    assert [s[0] for s in shapes.values()] == sorted(s[0] for s in shapes.values())


def test_local_checkpoint_loads_its_weights(tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=300, max_position_embeddings=64)
    original = transformers.GPTNeoXForCausalLM(cfg)
    original.save_pretrained(tmp_path / "ckpt")
    model = build_hf_model(str(tmp_path / "ckpt"), "myopic_kv", vocab_size=256, seed=1)
    for (n, a), b in zip(original.state_dict().items(), model.hf.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ConfigError, match="vocab_size 300"):
        build_hf_model(str(tmp_path / "ckpt"), "vanilla", vocab_size=1000, seed=0)
    with pytest.raises(ConfigError, match="neither a preset"):
        build_hf_model(str(tmp_path / "missing"), "vanilla", vocab_size=10, seed=0)


def test_sweep_end_to_end(tmp_path):
    folder = write_word_corpus(tmp_path / "corpus", 40, 200)
    out = tmp_path / "sweep"
    code = cli.main(["sweep", "--models", "pythia-14m,llama-tiny", "--data.corpus", str(folder), "--data.seq_len", "16",
                     "--train.steps", "2", "--train.batch_size", "4", "--train.progress", "false",
                     "--analysis.heldout_windows", "32", "--analysis.bootstrap", "100",
                     "--analysis.probe_train_windows", "16", "--analysis.probe_classes", "8",
                     "--analysis.top_kl", "3", "--pretrain.steps", "2", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["models"]] == ["pythia-14m", "llama-tiny"]
    assert all(r["parameters"] > 1e6 for r in results["models"])
    assert results["models"][0]["paper_gap"] == 0.157
    assert all(list(r["comparisons"]) == ["myopic vs vanilla"] for r in results["models"])
    report = (out / "report.md").read_text()
    assert "Myopia gap across model sizes" in report and "pretrained for 2 steps" in report
    assert (out / "pythia-14m" / "pretrain" / "vanilla").is_dir()
    assert (out / "gap_vs_params.png").exists()


def test_fresh_presets_size_their_embedding_to_the_tokenizer():
    from myopia.models.hf.presets import preset_vocab_size

    # The model's own tokenizer keeps the published shape (GPT-2: 50,257; Pythia: 50,304 for 50,277 ids).
    assert preset_vocab_size("gpt2-124m", 50257) == 50257
    assert preset_vocab_size("pythia-14m", 50277) == 50304
    # A small BPE gets a small embedding (rounded up to 64); a larger tokenizer than the preset's grows it.
    assert preset_vocab_size("pythia-14m", 4000) == 4032
    assert preset_vocab_size("gpt2-124m", 50277) == 50304
    model = build_hf_model("pythia-14m", "vanilla", vocab_size=4096, seed=0)
    assert model.hf.get_input_embeddings().weight.shape[0] == 4096
    assert model(torch.randint(0, 4096, (1, 8))).shape == (1, 8, 4096)


def test_attention_dropout_is_off_in_every_arm_and_said_in_the_log(tmp_path, capsys):
    """A GPT-2 checkpoint ships attn_pdrop 0.1: every arm (vanilla and myopic alike) trains without
    it, so the arms run the same kernels; the run's log says so once."""
    import transformers

    from myopia.models.hf.myopic import attention_modules

    cfg = transformers.GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=2, n_head=2, attn_pdrop=0.1,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    seen = []
    for mode in ("vanilla", "myopic"):
        model = build_hf_model(str(tmp_path / "gpt2"), mode, vocab_size=256, seed=0)
        assert model.config.attn_pdrop == 0.0
        seen += [m.attn_dropout.p for m in attention_modules(model.hf)]
        x = torch.randint(0, 256, (2, 16))
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # train mode, nothing random left
    assert seen == [0.0] * 4
    assert capsys.readouterr().out.count("attention-probability dropout (attn_pdrop=0.1) set to 0 in every arm") == 1
