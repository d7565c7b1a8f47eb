"""Trained arms open in TransformerLens 4 and nnsight straight from their run folders (offline): for
our GPT and a Llama-shaped Hugging Face model, vanilla and myopic arms, the tools' logits equal
myopia's own forward and their residual-stream hooks equal myopia's hidden states."""

import pytest
import torch
from conftest import write_word_corpus

from myopia import cli

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")

from myopia.interop.interp import hf_model, layer_output, nnsight_model, transformer_lens  # noqa: E402

COMMON = ["train", "--arms", "vanilla,myopic", "--data.source", "text", "--data.text.tokenizer", "byte",
          "--data.text.seq_len", "16", "--train.steps", "3", "--train.batch_size", "4", "--train.progress", "false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    corpus = write_word_corpus(root / "corpus", 30, 120)
    gpt, llama = root / "gpt", root / "llama"
    assert cli.main([*COMMON, "--data.text.corpus", str(corpus), "--model.n_embd", "32", "--model.n_head", "2",
                     "--model.n_layer", "2", "--model.block_size", "16", "--out", str(gpt)]) == 0
    assert cli.main(["lm", "--preset", "tiny", "--data.corpus", str(corpus), "--hf_model", "llama-tiny", "--arms",
                     "vanilla,myopic", "--train.steps", "3", "--analysis.heldout_windows", "16", "--out", str(llama)]) == 0
    return {"gpt": gpt, "llama": llama}


def _own(run, family, arm, x):
    """myopia's own forward of the arm: logits and the residual stream entering/leaving each block."""
    from myopia.interop.export import resolve_arm
    from myopia.train.checkpoint import read_checkpoint

    arm_dir, ckpt = resolve_arm(str(run / arm))
    weights, _, state, _ = read_checkpoint(ckpt)
    if family == "gpt":
        from myopia.models.gpt import GPT, GPTConfig

        model = GPT(GPTConfig.from_dict(state["model_config"]))
        model.load_state_dict(weights)
        with torch.no_grad():
            logits, hidden = model.eval()(x, return_hidden_states=True)
        return logits, hidden[:-1]  # the residual stream entering each block
    model, _ = hf_model(str(run / arm))  # the arm's transformers model is myopia's own for --hf_model arms
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    return out.logits, list(out.hidden_states[:-1])  # the last one has the final norm applied


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("arm", ["vanilla", "myopic"])
def test_transformer_lens_and_nnsight_match_myopia(runs, family, arm):
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, hidden = _own(runs[family], family, arm, x)
    bridge = transformer_lens(str(runs[family] / arm))
    with torch.no_grad():
        tl_logits, cache = bridge.run_with_cache(x)
    torch.testing.assert_close(tl_logits, logits, rtol=0, atol=1e-5)
    for layer in range(len(hidden)):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], rtol=0, atol=1e-5)
    lm = nnsight_model(str(runs[family] / arm))
    layers = lm.transformer.h if family == "gpt" else lm.model.layers
    with torch.no_grad(), lm.trace(x):
        first = layers[0].output.save()
        out = lm.output.save()
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer_output(first), hidden[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_text_is_tokenized_as_myopia_tokenizes_it(runs, family):
    """A string given to the bridge or to nnsight becomes the token ids myopia trains on (no BOS: TransformerLens
    would otherwise prepend a fallback BOS past the vocabulary), and the logits are myopia's on those ids."""
    text = "the whale sang"  # within the tiny models' 16-token context
    model, tokenizer = hf_model(str(runs[family] / "vanilla"))
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    logits, _ = _own(runs[family], family, "vanilla", ids)
    bridge = transformer_lens(str(runs[family] / "vanilla"))
    assert torch.equal(bridge.to_tokens(text), ids)
    with torch.no_grad():
        torch.testing.assert_close(bridge(text), logits, rtol=0, atol=1e-5)
    lm = nnsight_model(str(runs[family] / "vanilla"))
    with torch.no_grad(), lm.trace(text):
        out = lm.output.save()
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)


def test_a_synthetic_arm_is_refused_in_one_line(tmp_path):
    from myopia.interop.export import ExportError

    out = tmp_path / "syn"
    assert cli.main(["train", "--arms", "vanilla", "--train.steps", "1", "--train.batch_size", "4", "--train.progress",
                     "false", "--model.n_embd", "16", "--model.n_head", "2", "--data.synthetic.seq_len", "8",
                     "--out", str(out)]) == 0
    with pytest.raises(ExportError, match="continuous vectors"):
        hf_model(str(out / "vanilla"))
