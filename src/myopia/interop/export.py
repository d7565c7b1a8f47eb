"""``myopia export RUN/ARM OUT_DIR``: a trained arm as a plain transformers checkpoint.

The output folder (``model.safetensors``, ``config.json``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json``) loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` without myopia installed. A myopia GPT maps exactly (same logits)
onto a transformers class or is refused:

- learned positions (the GPT-2 shape) -> ``GPT2LMHeadModel`` (gelu is GPT-2's tanh approximation,
  ``gelu_pytorch_tanh``; relu is ``relu``; ``bias=False`` becomes zero biases, which give the same
  outputs);
- rotary positions without grouped-query attention -> ``GPTNeoXForCausalLM`` (sequential residual,
  rotary over the whole head, the fused QKV projection reordered to NeoX's per-head layout);
- anything else (grouped-query attention, continuous inputs/outputs) -> a one-line
  :class:`ExportError` naming the option in the way.

Arms trained with ``--hf_model`` are transformers models already: they are written with
``save_pretrained``. The tokenizer is the run's (rebuilt from its ``config.yaml``; a trained BPE
comes from the cache the run made), written as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import yaml

from myopia.config import ConfigError
from myopia.train import layout


class ExportError(ConfigError):
    """A model or run that cannot be exported; the message is one line naming the obstacle."""


@dataclass
class ExportConfig:
    """Write a trained arm as a transformers checkpoint (model, config, tokenizer)."""

    arm: str = ""
    """The arm to export: an arm folder (RUN/vanilla; for an lm run RUN/ARM takes the first seed's,
    RUN/seed0/ARM) or a checkpoint folder (…/checkpoints/step_NNNNNNN)."""
    out: str = ""
    """Output folder (created; must be empty or absent)."""

    def __post_init__(self) -> None:
        if not self.arm or not self.out:
            raise ValueError("give the arm and the output folder: myopia export RUN/ARM OUT_DIR")


# --- the myopia GPT -> transformers mapping ------------------------------------------------------------


def _obstacle(cfg) -> str | None:
    """Why a GPTConfig has no exact transformers equivalent here (None if it has one)."""
    if cfg.input_dim is not None or cfg.output_dim is not None:
        return (f"input_dim={cfg.input_dim}/output_dim={cfg.output_dim}: continuous inputs or outputs "
                "(the synthetic task's model) have no causal-LM class in transformers")
    kv = cfg.n_kv_head or cfg.n_head
    if kv != cfg.n_head:
        family = "GPT-2" if cfg.position == "learned" else "GPT-NeoX"
        return (f"n_kv_head={kv} (grouped-query attention) with position={cfg.position}: {family}, the "
                "transformers class with this layout, has no grouped-query attention")
    return None


def gpt_to_transformers(model) -> torch.nn.Module:
    """A transformers causal LM computing exactly what the myopia ``GPT`` ``model`` computes."""
    import transformers

    cfg = model.config
    why = _obstacle(cfg)
    if why is not None:
        raise ExportError(f"cannot export this myopia GPT: {why}")
    act = {"gelu": "gelu_pytorch_tanh", "relu": "relu"}[cfg.activation]
    sd = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    C = cfg.n_embd
    hidden = cfg.mlp_ratio * C

    def bias(name: str, size: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(size))

    if cfg.position == "learned":
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=C, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=hidden, activation_function=act, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None)
        out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
               "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": bias("ln_f.bias", C),
               "lm_head.weight": sd["head.weight"]}
        for i in range(cfg.n_layer):
            s, d = f"blocks.{i}.", f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[d + ln + ".weight"] = sd[s + ln + ".weight"]
                out[d + ln + ".bias"] = bias(s + ln + ".bias", C)
            for src, dst, n_out in (("attn.c_attn", "attn.c_attn", 3 * C), ("attn.c_proj", "attn.c_proj", C),
                                    ("mlp.c_fc", "mlp.c_fc", hidden), ("mlp.c_proj", "mlp.c_proj", C)):
                out[d + dst + ".weight"] = sd[s + src + ".weight"].t().contiguous()  # Conv1D: (in, out)
                out[d + dst + ".bias"] = bias(s + src + ".bias", n_out)
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    else:
        H, D = cfg.n_head, cfg.head_dim
        hf_cfg = transformers.GPTNeoXConfig(
            vocab_size=cfg.vocab_size, hidden_size=C, num_hidden_layers=cfg.n_layer, num_attention_heads=H,
            intermediate_size=hidden, hidden_act=act, max_position_embeddings=cfg.block_size,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": 1.0},
            use_parallel_residual=False, attention_bias=True, attention_dropout=0.0, hidden_dropout=cfg.dropout,
            layer_norm_eps=cfg.layer_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=None, eos_token_id=None)
        # NeoX's fused projection is laid out per head as [q_h; k_h; v_h]; myopia's as [Q; K; V].
        order = torch.cat([torch.arange(D) + part * C + h * D for h in range(H) for part in range(3)])
        out = {"gpt_neox.embed_in.weight": sd["wte.weight"], "lm_head.weight": sd["head.weight"],
               "gpt_neox.final_layer_norm.weight": sd["ln_f.weight"],
               "gpt_neox.final_layer_norm.bias": bias("ln_f.bias", C)}
        for i in range(cfg.n_layer):
            s, d = f"blocks.{i}.", f"gpt_neox.layers.{i}."
            for src, dst in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
                out[d + dst + ".weight"] = sd[s + src + ".weight"]
                out[d + dst + ".bias"] = bias(s + src + ".bias", C)
            out[d + "attention.query_key_value.weight"] = sd[s + "attn.c_attn.weight"][order]
            out[d + "attention.query_key_value.bias"] = bias(s + "attn.c_attn.bias", 3 * C)[order]
            for src, dst, n_out in (("attn.c_proj", "attention.dense", C), ("mlp.c_fc", "mlp.dense_h_to_4h", hidden),
                                    ("mlp.c_proj", "mlp.dense_4h_to_h", C)):
                out[d + dst + ".weight"] = sd[s + src + ".weight"]
                out[d + dst + ".bias"] = bias(s + src + ".bias", n_out)
        hf = transformers.GPTNeoXForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # pragma: no cover - a transformers layout change
        raise ExportError(f"transformers {transformers.__version__} changed its {type(hf).__name__} layout "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}); export needs updating")
    return hf.eval()


# --- tokenizers -----------------------------------------------------------------------------------------


def byte_level_tokenizer():
    """myopia's ``byte`` tokenizer (id = UTF-8 byte) as a ``tokenizers.Tokenizer``: a byte-level BPE
    without merges whose vocabulary maps the byte-level character of byte b to id b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-level alphabet (GPT-2's reversible byte -> printable character table).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def transformers_tokenizer(tokenizer):
    """A myopia ``TextTokenizer`` as a transformers tokenizer (a ``PreTrainedTokenizerFast``, or the run's
    own transformers tokenizer for hf:NAME and smollm2)."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend
    if backend is None and tokenizer.name == "byte":
        backend = byte_level_tokenizer()
    if backend is None:
        raise ExportError(f"tokenizer {tokenizer.name!r} cannot be written as a transformers tokenizer")
    if hasattr(backend, "save_pretrained"):  # already a transformers tokenizer (hf:NAME, smollm2)
        return backend
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   model_max_length=int(1e30))


def save_tokenizer(tokenizer, out: str) -> None:
    """Write a myopia ``TextTokenizer`` as ``tokenizer.json`` + ``tokenizer_config.json``."""
    transformers_tokenizer(tokenizer).save_pretrained(out)


def run_tokenizer(config: dict):
    """The tokenizer of a run, rebuilt from its config.yaml (None for synthetic-data runs)."""
    from myopia.data.corpus import load_documents, split_documents
    from myopia.data.tokenizer import build_tokenizer
    from myopia.tasks.text import TextConfig, default_cache_dir

    data = config.get("data") or {}
    if "source" in data:  # myopia train's DataConfig
        if data["source"] != "text":
            return None
        data = data.get("text") or {}
    text = TextConfig(**data)
    docs = load_documents(text.corpus, "data.text.corpus")
    train_docs, _ = split_documents(docs, text.heldout_fraction)
    cache = os.path.join(text.cache_dir or default_cache_dir(), "tokenizers")
    return build_tokenizer(text.tokenizer, text.vocab_size, train_docs, cache)


# --- runs -----------------------------------------------------------------------------------------------


def resolve_arm(path: str) -> tuple[str, str]:
    """``(arm folder, checkpoint folder)`` for an arm folder, a checkpoint folder, or RUN/ARM of an lm run
    (its first seed's arm)."""
    from myopia.train.checkpoint import latest_checkpoint

    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, "state.json")):
        return os.path.dirname(os.path.dirname(path)), path
    arm_dir = path
    if not layout.is_arm_dir(path):
        run, arm = os.path.split(path)
        seeds = layout.arm_over_seeds(run, arm)
        if not seeds:
            raise ExportError(f"{path!r} is neither an arm folder (with checkpoints/), a checkpoint folder, "
                              "nor RUN/ARM of an lm run")
        arm_dir = seeds[0]
        if len(seeds) > 1:
            print(f"myopia export: {path} has {len(seeds)} seeds; exporting {arm_dir}", flush=True)
    ckpt = latest_checkpoint(layout.checkpoints_dir(arm_dir))
    if ckpt is None:
        raise ExportError(f"{arm_dir!r} holds no complete checkpoint")
    return arm_dir, ckpt


def run_config(arm_dir: str) -> dict:
    path = layout.config_path(os.path.dirname(arm_dir))
    if not os.path.isfile(path):
        raise ExportError(f"{path} is missing: export needs the run's config.yaml beside the arm folder")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def load_arm_model(arm_dir: str, ckpt: str, config: dict, vocab_size: int) -> torch.nn.Module:
    """The transformers model of an arm: a myopia GPT mapped onto a transformers class, or the
    ``--hf_model`` arm's own model with the checkpoint's weights."""
    from myopia.train.checkpoint import read_checkpoint

    weights, _, state, _ = read_checkpoint(ckpt)
    from myopia.attention import Cut

    spec = (state.get("model_config") or {}).get("attention")
    if spec is None and state.get("arm"):
        from myopia.runs.arms import parse_arm

        spec = parse_arm(state["arm"]).cut
    if spec is not None and Cut.parse(spec).changes_forward:
        raise ExportError(f"{arm_dir} was trained with attention={Cut.parse(spec).spec} (positions attend only to "
                          "themselves there): a transformers model would compute ordinary causal attention, a "
                          "different forward")
    if config.get("hf_model"):
        from myopia.models.hf.presets import build_hf_model

        seed = (config.get("train") or {}).get("seed", 0)
        wrapper = build_hf_model(config["hf_model"], "vanilla", vocab_size, seed)
        lora = config.get("lora") or {}
        if lora.get("r"):
            from myopia.models.hf.lora import LoraConfig, with_lora

            wrapper = with_lora(wrapper, LoraConfig(**lora))
        wrapper.load_state_dict(weights)
        hf = wrapper.hf.merge_and_unload() if lora.get("r") else wrapper.hf  # LoRA merged into the weights
        return hf.eval()
    from myopia.models.gpt import GPT, GPTConfig

    if any(k.startswith("frozen.") for k in weights):
        raise ExportError(f"{arm_dir} is a local-myopic arm: it reads a frozen model's past states, which no "
                          "transformers class computes")
    if "model_config" not in state or state["model_config"] is None:
        raise ExportError(f"checkpoint {ckpt} does not record its model configuration")
    cfg = GPTConfig.from_dict({**state["model_config"], "attention": "vanilla", "beta": 0.0})
    model = GPT(cfg)
    model.load_state_dict(weights)
    return gpt_to_transformers(model.eval())


def export(arm: str, out: str) -> str:
    arm_dir, ckpt = resolve_arm(arm)
    if os.path.isdir(out) and os.listdir(out):
        raise ExportError(f"output folder {out!r} is not empty; choose a new one")
    config = run_config(arm_dir)
    tokenizer = run_tokenizer(config)
    if tokenizer is None:
        raise ExportError(f"{arm_dir} was trained on synthetic data (data.source=synthetic): a model of "
                          "continuous vectors has no transformers causal-LM equivalent")
    model = load_arm_model(arm_dir, ckpt, config, tokenizer.vocab_size)
    if getattr(model.config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        model.config._attn_implementation = "sdpa"
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    print(f"myopia export: {ckpt} -> {out} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, tokenizer {tokenizer.name})", flush=True)
    return out


def run(cfg: ExportConfig) -> dict:
    return {"out": export(cfg.arm, cfg.out), "status": "completed"}


__all__ = ["ExportConfig", "ExportError", "byte_level_tokenizer", "export", "gpt_to_transformers", "run",
           "save_tokenizer", "transformers_tokenizer"]
