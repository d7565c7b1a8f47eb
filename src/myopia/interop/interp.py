"""A trained arm opened in the interpretability tools researchers use: TransformerLens and nnsight.

Every arm whose forward is a causal LM's (vanilla, myopic, myopic_kv, any horizon or layer cut: their
forward values are vanilla's; our GPT mapped onto GPT-2 or GPT-NeoX as ``myopia export`` does, an
``--hf_model`` arm as its own transformers model, LoRA merged) loads straight from its run folder::

    from myopia.interop.interp import hf_model, transformer_lens, nnsight_model
    bridge = transformer_lens("runs/x/myopic")            # TransformerLens 4 TransformerBridge
    logits, cache = bridge.run_with_cache(tokens)          # cache["blocks.0.hook_resid_post"], ...
    lm = nnsight_model("runs/x/vanilla")                   # nnsight TransformersModel
    with lm.trace(tokens):
        h = lm.transformer.h[0].output.save()              # a tensor on transformers 5

Both get the model in eager attention (TransformerLens hooks the attention pattern; eager is what the
equality checks use). Two version notes: TransformerLens 4 has no
``HookedTransformer.from_pretrained(..., hf_model=)``; its ``TransformerBridge.boot_transformers``
takes the transformers model and a local folder for the config and tokenizer, which
:func:`transformer_lens` writes (config and tokenizer only, no weights). On transformers 5 a decoder
layer returns a tensor, not a tuple, so nnsight's ``layer.output`` is the hidden state itself (on
transformers 4 it was ``layer.output[0]``): :func:`layer_output` reads either.

Optional extra: ``pip install 'myopia[interp]'`` (transformer-lens, nnsight).
"""

from __future__ import annotations

import os
import tempfile

import torch

from myopia.interop.export import (
    ExportError,
    load_arm_model,
    resolve_arm,
    run_config,
    run_tokenizer,
    transformers_tokenizer,
)


def hf_model(arm: str):
    """``(model, tokenizer)``: the arm (an arm folder, a checkpoint folder or RUN/ARM) as a transformers
    causal LM in eager attention, in eval mode, and its tokenizer as a transformers tokenizer."""
    arm_dir, ckpt = resolve_arm(arm)
    config = run_config(arm_dir)
    tokenizer = run_tokenizer(config)
    if tokenizer is None:
        raise ExportError(f"{arm_dir} was trained on synthetic data (continuous vectors): TransformerLens and "
                          "nnsight open token language models; read its hidden states with "
                          "GPT.forward(x, return_hidden_states=True)")
    model = load_arm_model(arm_dir, ckpt, config, tokenizer.vocab_size)
    model.set_attn_implementation("eager")
    return model.eval(), transformers_tokenizer(tokenizer)


def transformer_lens(arm: str, folder: str | None = None, device: str = "cpu"):
    """The arm as a TransformerLens 4 ``TransformerBridge`` (hook names as TransformerLens's:
    ``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_pattern``, ...). ``folder`` receives the
    config and tokenizer the bridge reads (a temporary folder if None). Strings are tokenized without a
    BOS token, as myopia trains (``bridge.cfg.default_prepend_bos`` is False)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        raise ImportError("myopia.interop.interp.transformer_lens needs TransformerLens 4: "
                          "pip install 'myopia[interp]'") from exc
    model, tokenizer = hf_model(arm)
    folder = folder or tempfile.mkdtemp(prefix="myopia-tl-")
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tokenizer, device=device)
    # myopia trains and scores windows of plain text tokens, with no BOS; TransformerLens prepends one by
    # default and, for a tokenizer without one (ours), installs a fallback whose id is past the model's
    # vocabulary. Strings are therefore tokenized as myopia tokenizes them (``prepend_bos=True`` still
    # works where the tokenizer has a BOS of its own).
    bridge.cfg.default_prepend_bos = False
    return bridge


def nnsight_model(arm: str):
    """The arm as an nnsight ``TransformersModel`` for text generation (nnsight 0.8's successor of
    ``LanguageModel``, which still works and warns); its modules are the transformers model's."""
    try:
        from nnsight import TransformersModel
    except ImportError as exc:
        raise ImportError("myopia.interop.interp.nnsight_model needs nnsight >= 0.8: "
                          "pip install 'myopia[interp]'") from exc
    model, tokenizer = hf_model(arm)
    return TransformersModel(model, task="text-generation", tokenizer=tokenizer)


def layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden state from what nnsight (or a forward hook) sees as its output: the
    tensor itself on transformers 5, the first element of a tuple on transformers 4."""
    return output[0] if isinstance(output, tuple) else output


__all__ = ["hf_model", "layer_output", "nnsight_model", "transformer_lens"]
