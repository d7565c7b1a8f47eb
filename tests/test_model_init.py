"""GPTConfig.init / io_init: each option gives the initialisation its docstring states, and the
default (gpt2, body) is the recipe GPT always used, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from myopia.cli import main
from myopia.models.gpt import GPT, GPTConfig

SYNTH = dict(n_layer=2, n_head=2, n_embd=128, activation="relu", input_dim=2, output_dim=1, block_size=32)


def _build(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**kw))


def _old_recipe(self: GPT) -> None:  # GPT's initialisation before init/io_init existed, verbatim
    self.apply(self._init_weights)
    residual_std = self.config.init_std / math.sqrt(2 * self.config.n_layer)
    for block in self.blocks:
        nn.init.normal_(block.attn.c_proj.weight, std=residual_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=residual_std)


def _body_linears(model: GPT) -> list[nn.Linear]:
    return [m for b in model.blocks for m in b.modules() if isinstance(m, nn.Linear)]


def _is_torch_default(linear: nn.Linear) -> bool:
    """Kaiming-uniform(a=√5) weights and uniform biases: U(±1/√fan_in), std bound/√3."""
    bound = 1 / math.sqrt(linear.in_features)
    w = linear.weight.detach()
    ok = bool(w.abs().max() <= bound) and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.15
    if linear.bias is not None:
        b = linear.bias.detach()
        ok = ok and bool(b.abs().max() <= bound) and bool((b != 0).all())
    return ok


@pytest.mark.parametrize("kw", [SYNTH, dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100),
                                dict(n_layer=3, n_head=4, n_embd=64, vocab_size=100, position="rotary",
                                     tie_embeddings=False, bias=False)])
def test_default_init_is_the_old_recipe_bit_for_bit(kw, monkeypatch):
    new = _build(**kw).state_dict()
    rng_new = torch.rand(4)
    monkeypatch.setattr(GPT, "_initialise", _old_recipe)
    old = _build(**kw).state_dict()
    assert torch.equal(torch.rand(4), rng_new)  # and the random stream after construction is the same
    assert old.keys() == new.keys()
    for k in old:
        assert torch.equal(old[k], new[k]), k


def test_gpt2_init_is_std_002_with_scaled_residuals():
    model = _build(**SYNTH)
    residual = [p for b in model.blocks for p in (b.attn.c_proj, b.mlp.c_proj)]
    for m in _body_linears(model) + [model.wte, model.head]:
        if any(m is r for r in residual):
            assert m.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
        else:
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert not _is_torch_default(m)
        assert (m.bias == 0).all()
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_io_init_torch_default_is_the_papers_model():
    ref, model = _build(**SYNTH), _build(**SYNTH, io_init="torch-default")
    assert _is_torch_default(model.wte) and _is_torch_default(model.head)  # Linear(2→d), Linear(d→1)
    assert model.wte.weight.std().item() > 0.3  # bound 1/√2: nothing like std 0.02
    # the body, the position table and the LayerNorms are the gpt2 initialisation, value for value
    for name, tensor in ref.state_dict().items():
        if not name.startswith(("wte.", "head.")):
            assert torch.equal(tensor, model.state_dict()[name]), name


def test_init_torch_default_leaves_every_linear_at_pytorchs_default():
    model = _build(**SYNTH, init="torch-default")
    for m in _body_linears(model) + [model.wte, model.head]:
        assert _is_torch_default(m), m
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)  # not nn.Embedding's N(0, 1)
    tok = _build(n_layer=1, n_head=2, n_embd=64, vocab_size=200, init="torch-default")
    assert tok.wte.weight.std().item() == pytest.approx(0.02, rel=0.1) and tok.head.weight is tok.wte.weight
    assert all(_is_torch_default(m) for m in _body_linears(tok))


def test_init_options_are_validated(capsys):
    with pytest.raises(ValueError, match="GPTConfig.init='xavier' is not one of gpt2, torch-default"):
        GPTConfig(init="xavier")
    with pytest.raises(ValueError, match="GPTConfig.io_init='gpt2' is not one of body, torch-default"):
        GPTConfig(io_init="gpt2")
    with pytest.raises(ValueError, match="a token model has none"):
        GPT(GPTConfig(vocab_size=10, n_embd=16, n_head=2, io_init="torch-default"))
    assert main(["synthetic", "--preset", "tiny", "--model.init", "xavier", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "init='xavier'" in err and "\n" not in err


def test_synthetic_paper_preset_is_the_papers_training(capsys):
    """The reference's model (std 0.02 body, PyTorch-default input/output layers) trained as the
    reference trains it: AdamW lr 1e-3, wd 0.01, 1% warm-up + cosine, and no gradient clipping."""
    import yaml

    assert main(["synthetic", "--preset", "paper", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["model"]["init"], cfg["model"]["io_init"]) == ("gpt2", "torch-default")
    assert cfg["optim"]["grad_clip"] == 0.0
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["optim"]["warmup"]) == (1e-3, 0.01, 0.01)
    assert (cfg["train"]["batch_size"], cfg["train"]["steps"], cfg["task"]["frequency"]) == (512, 58593, 10.0)


def test_synthetic_cpu_preset_is_sin10_and_cpu_sin4_keeps_the_old_setting(capsys):
    """cpu trains the paper's sin(10x) with the model that learns it on a CPU budget (rotary positions,
    PyTorch's default initialisation, no clipping, a 10% warm-up that makes vanilla learn at 10 of 10
    fresh seeds); cpu-sin4 keeps the earlier calibrated setting."""
    import yaml

    def resolved(preset):
        assert main(["synthetic", "--preset", preset, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    cpu, sin4 = resolved("cpu"), resolved("cpu-sin4")
    assert (cpu["task"]["frequency"], cpu["task"]["seq_len"]) == (10.0, 32)
    assert (cpu["model"]["position"], cpu["model"]["init"], cpu["model"]["io_init"]) == \
        ("rotary", "torch-default", "torch-default")
    assert (cpu["optim"]["grad_clip"], cpu["optim"]["warmup"]) == (0.0, 0.1)
    assert sin4["optim"]["warmup"] == 0.01
    assert sin4["task"]["frequency"] == 4.0
    assert (sin4["model"]["position"], sin4["model"]["init"], sin4["model"]["io_init"]) == ("learned", "gpt2", "body")
    assert sin4["optim"]["grad_clip"] == 1.0
    assert cpu["train"] == sin4["train"]
