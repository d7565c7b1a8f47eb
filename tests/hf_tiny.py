"""Tiny random Hugging Face models of the families make_myopic supports (built from configs; nothing
downloaded), shared by the tests that check them against the definition."""

import torch
import torch.nn.functional as F
import transformers

V, T = 23, 7
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build(family):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_positions=16, n_embd=16, n_layer=2, n_head=4, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **COMMON)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=32, rotary_pct=0.5, use_parallel_residual=True,
                                         max_position_embeddings=16, attention_dropout=0.0,
                                         hidden_dropout=0.0, **COMMON)
        model = transformers.GPTNeoXForCausalLM(cfg)
    elif family in ("llama-gqa", "llama"):
        cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=16, **COMMON)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=16, **COMMON)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise KeyError(family)
    return model.double().train()


def data(batch=2):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (batch, T), generator=g), torch.randint(0, V, (batch, T), generator=g)


def losses(model, x, y):
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
