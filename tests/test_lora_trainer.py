"""LoRA (PEFT) and the Hugging Face Trainer train the myopic gradient exactly (float64, definitional)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from definition import cut_module_input, per_position_gradient, relative_error

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from myopia.models.hf.lora import LoraConfig, apply_lora
from myopia.models.hf.myopic import attention_modules, make_myopic

from hf_tiny import T, V, build, data, losses  # noqa: E402


def definition(model, params, T_loss, loss_at):
    """Σ_i ∂L_i/∂θ with every other position's attention input detached (vanilla attention)."""
    make_myopic(model, "vanilla")
    modules = attention_modules(model)

    def install(i):
        return cut_module_input(modules, i)

    return per_position_gradient(params, T_loss, loss_at, install)


def grads(loss, params):
    return [g if g is not None else torch.zeros_like(p) for p, g in
            zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def lora_model(family):
    model = apply_lora(build(family), LoraConfig(r=4, alpha=8.0), init=False)  # random B: nonzero A grads
    return model.double()


@pytest.mark.parametrize("order", ["lora_first", "myopic_first"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_gradient_equals_definition(family, order):
    if order == "lora_first":
        model = lora_model(family)
        make_myopic(model, "myopic")
    else:
        model = make_myopic(build(family), "myopic")
        model = apply_lora(model, LoraConfig(r=4, alpha=8.0), init=False).double()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in names)
    assert any("q_proj" in n or "c_attn" in n for n in names) and any("mlp" in n for n in names)
    x, y = data()
    got = grads(losses(model, x, y).sum(), params)
    want = definition(model, params, T, lambda i: losses(model, x, y)[:, i].sum())
    assert relative_error(got, want) < 1e-10
    vanilla = grads(losses(model, x, y).sum(), params)
    assert relative_error(vanilla, want) > 1e-3


class _GradCapture(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = [p.grad.detach().clone() for p in self.model.parameters()]


def _train_one_step(model, x, out_dir, checkpointing):
    capture = _GradCapture(model)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=len(x), max_steps=1, learning_rate=1e-3,
        max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        gradient_checkpointing=checkpointing, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True, seed=0)
    # labels[0] is never a target (the model shifts labels by one); -100 there makes the Trainer's
    # token count (labels != -100, before the shift in this version) the number of loss terms.
    rows = [{"input_ids": r, "labels": torch.cat([torch.tensor([-100]), r[1:]])} for r in x]
    # transformers' own causal-LM loss casts logits to float32; this is the same loss in float64 so the
    # comparison can be exact to 1e-10 (with the built-in loss it agrees to ~1e-8, float32 rounding).
    def loss64(outputs, labels, num_items_in_batch=None):
        logits, target = outputs.logits[:, :-1], labels[:, 1:]
        total = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else (target != -100).sum())

    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[capture],
                                   compute_loss_func=loss64)
    trainer.train()
    assert model.is_gradient_checkpointing == checkpointing
    return capture.grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_step_is_myopic(tmp_path, checkpointing):
    """make_myopic(model) then transformers.Trainer(...).train(): one step's gradient is the definition's."""
    x, _ = data(batch=3)
    model = build("gpt2")
    params = list(model.parameters())
    n_terms = x.shape[0] * (T - 1)  # the model's loss: mean CE of logits[:, :-1] against x[:, 1:]

    def loss_at(i):
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits[:, i], x[:, i + 1], reduction="sum") / n_terms

    want = definition(model, params, T - 1, loss_at)
    make_myopic(model, "myopic")
    got = _train_one_step(model, x, tmp_path / "trainer", checkpointing)
    assert relative_error(got, want) < 1e-10
    model2 = build("gpt2")
    vanilla = _train_one_step(model2, x, tmp_path / "trainer2", checkpointing)
    assert relative_error(vanilla, want) > 1e-3


def test_myopic_model_save_and_reload(tmp_path):
    """A myopic model saves as an ordinary checkpoint: reloaded, it gives the same logits, and its
    config does not name myopia's attention function (it loads without myopia)."""
    model = make_myopic(build("gpt2"), "myopic")
    x, _ = data()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "myopia" not in json.dumps(config)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, want, rtol=0, atol=1e-12)
    make_myopic(reloaded, "myopic")  # and it trains myopically again
    assert reloaded.config._attn_implementation == "myopia"
    assert os.path.isfile(tmp_path / "ckpt" / "model.safetensors")


@pytest.mark.parametrize("order", ["lora_first", "myopic_first"])
def test_lora_base_projections_run_once_and_unwrap(order):
    """The LoRA layers' base projections take myopia's one-projection path (no projection runs twice)
    and switching back to vanilla removes every wrapper, in either order of apply_lora/make_myopic."""
    if order == "lora_first":
        model = make_myopic(lora_model("llama"), "myopic")
    else:
        model = apply_lora(make_myopic(build("llama"), "myopic"), LoraConfig(r=4), init=False)
    bases = [m.base_layer for a in attention_modules(model) for m in a.children() if hasattr(m, "base_layer")]
    assert len(bases) == 8  # q, k, v, o in 2 layers
    assert all(getattr(b, "_myopia_original_forward", None) is not None for b in bases)
    make_myopic(model, "vanilla")
    assert all(getattr(b, "_myopia_original_forward", None) is None and "forward" not in vars(b) for b in bases)


def test_lm_hf_model_with_lora_trains_adapters_and_exports(tmp_path):
    """myopia lm --hf_model DIR --lora.r 4: only the adapters train (in every arm), and myopia export
    writes the arm with LoRA merged: plain transformers gives the trained model's logits."""
    from conftest import write_word_corpus

    from myopia.cli import main
    from myopia.interop.export import load_arm_model, resolve_arm, run_config
    from myopia.models.hf.lora import with_lora
    from myopia.models.hf.presets import build_hf_model
    from myopia.train.checkpoint import read_checkpoint

    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=320, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    base.save_pretrained(tmp_path / "base")
    corpus = write_word_corpus(tmp_path / "corpus", 30, 100)
    out = tmp_path / "run"
    assert main(["lm", "--preset", "tiny", "--out", str(out), "--hf_model", str(tmp_path / "base"),
                 "--lora.r", "4", "--arms", "vanilla,myopic", "--data.corpus", str(corpus),
                 "--data.vocab_size", "300", "--train.steps", "3", "--analysis.first_position_tokens", "-1",
                 "--analysis.gradient_split_batches", "0", "--analysis.heldout_windows", "16",
                 "--analysis.probe_train_windows", "8", "--analysis.probe_classes", "4"]) == 0
    arm_dir, ckpt = resolve_arm(str(out / "myopic"))
    weights = read_checkpoint(ckpt)[0]
    frozen = weights["hf.base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"]
    assert torch.equal(frozen, base.transformer.h[0].attn.c_attn.weight.detach())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # the adapters moved
    assert main(["export", str(out / "myopic"), str(tmp_path / "hf")]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    config = run_config(arm_dir)
    trained = with_lora(build_hf_model(config["hf_model"], "vanilla", 300, 0), LoraConfig(**config["lora"]))
    trained.load_state_dict(weights)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - trained.eval()(x)).abs().max().item() < 1e-5
    assert type(load_arm_model(arm_dir, ckpt, config, 300)).__name__ == "GPT2LMHeadModel"
