"""Every Hugging Face family make_myopic claims, and the ones a review found going wrong, on tiny
random float64 configs (nothing downloaded): the forward pass equals the unwrapped model's (through
transformers' eager formula with every score term, in float64), and the gradient equals the definition
(tests/definition.py) to 1e-10 relative, for both cuts; or make_myopic refuses with a one-line error.
Vanilla gradients differ from the definition by more than 1e-3, so every check can fail."""

import pytest
import torch
import torch.nn.functional as F
from definition import cut_module_input, gradients, mix_position, per_position_gradient, relative_error

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from myopia.models.hf.myopic import attention_modules, make_myopic

V, T = 23, 7
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=1)
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32, attention_dropout=0.0, **COMMON)
MLA = dict(kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=4,
           num_key_value_heads=4)


def _config(family):
    t = transformers
    if family == "gpt2":
        return t.GPT2Config(n_positions=16, n_embd=16, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **COMMON), t.GPT2LMHeadModel
    if family == "gpt_neox":
        return t.GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                               rotary_pct=0.5, max_position_embeddings=16, attention_dropout=0.0,
                               hidden_dropout=0.0, **COMMON), t.GPTNeoXForCausalLM
    if family == "llama":
        return t.LlamaConfig(**SMALL), t.LlamaForCausalLM
    if family == "mistral":  # a sliding window shorter than the sequence
        return t.MistralConfig(sliding_window=3, **SMALL), t.MistralForCausalLM
    if family == "qwen2":
        return t.Qwen2Config(**SMALL), t.Qwen2ForCausalLM
    if family == "qwen3":  # per-head norms on queries and keys after the projections
        return t.Qwen3Config(head_dim=4, **SMALL), t.Qwen3ForCausalLM
    if family == "gemma2":  # logit soft-capping (5, to make it bite), sliding windows, query_pre_attn_scalar
        return t.Gemma2Config(head_dim=4, sliding_window=3, attn_logit_softcapping=5.0, query_pre_attn_scalar=8,
                              **SMALL), t.Gemma2ForCausalLM
    if family == "gpt_oss":  # attention sinks, sliding windows, mixture of experts
        return t.GptOssConfig(head_dim=4, sliding_window=3, num_local_experts=2, num_experts_per_tok=1,
                              **SMALL), t.GptOssForCausalLM
    if family == "deepseek_v3":  # multi-head latent attention: two-stage projections, value head size of its own
        cfg = {**SMALL, **MLA}
        return t.DeepseekV3Config(n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
                                  moe_intermediate_size=8, first_k_dense_replace=1, **cfg), t.DeepseekV3ForCausalLM
    if family == "deepseek_v2":
        cfg = {**SMALL, **MLA}
        return t.DeepseekV2Config(n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
                                  moe_intermediate_size=8, first_k_dense_replace=1, **cfg), t.DeepseekV2ForCausalLM
    if family == "minicpm3":
        cfg = {**SMALL, **MLA}
        return t.MiniCPM3Config(**cfg), t.MiniCPM3ForCausalLM
    raise KeyError(family)


def exact_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, s_aux=None,
                    **kwargs):
    """transformers' eager attention formula (scores, soft-cap, additive mask, sinks, softmax) kept in
    the input's precision: the families' own eager functions take the softmax in float32."""
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    s = query @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is not None:
        s = s + attention_mask[..., : k.shape[-2]]
    if s_aux is not None:
        s = torch.cat([s, s_aux.reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if s_aux is not None:
        p = p[..., :-1]
    return (p @ v).transpose(1, 2).contiguous(), p


AttentionInterface.register("exact64", exact_attention)
AttentionMaskInterface.register("exact64", eager_mask)


def _exact_rms_norm(module):
    """The module's RMSNorm in float64 (transformers computes it in float32, which would hide
    float64-exactness behind float32 rounding in the families with norms inside attention)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    one_plus = type(module).__name__.startswith("Gemma")  # Gemma scales by (1 + weight)

    def forward(x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * (1.0 + module.weight) if one_plus else module.weight * y

    module.forward = forward


def build(family, exact=True):
    """The tiny model in float64; ``exact``: with attention and RMSNorm kept in float64 (else the
    family's own eager functions, for the check that both compute the same function)."""
    cfg, cls = _config(family)
    torch.manual_seed(0)
    model = cls(cfg).double()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # grouped matmuls take no float64
    with torch.no_grad():  # random (not initial-zero) sinks and norm weights, so that they matter
        for name, p in model.named_parameters():
            if name.endswith("sinks") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    if exact:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                _exact_rms_norm(m)
    model.set_attn_implementation("exact64" if exact else "eager")
    return model.train()


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g)


def losses(model, x, y):
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)


def definition(model, x, y, cut):
    """Σ_i ∂L_i/∂θ through :func:`exact_attention`, positions j ≠ i cut at the attention input
    (``hidden``) or at the keys/values (``kv``)."""
    make_myopic(model, "vanilla")
    params = list(model.parameters())
    modules = attention_modules(model)

    def install(i):
        if cut == "hidden":
            return cut_module_input(modules, i)

        def kv_cut(module, query, key, value, *args, **kwargs):
            return exact_attention(module, query, mix_position(key, i, 2), mix_position(value, i, 2), *args, **kwargs)

        AttentionInterface.register("kvcut", kv_cut)
        AttentionMaskInterface.register("kvcut", eager_mask)
        model.set_attn_implementation("kvcut")

        class Restore:
            def remove(self):
                model.set_attn_implementation("exact64")
        return [Restore()]

    return per_position_gradient(params, T, lambda i: losses(model, x, y)[:, i].sum(), install)


EXACT = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt_oss", "deepseek_v3",
         "deepseek_v2", "minicpm3"]


@pytest.mark.parametrize("family", EXACT)
@pytest.mark.parametrize("mode,cut", [("myopic", "hidden"), ("myopic_kv", "kv")])
def test_family_forward_unchanged_and_gradient_equals_definition(family, mode, cut):
    model = build(family)
    x, y = data()
    with torch.no_grad():
        base = model(input_ids=x, use_cache=False).logits
        own = build(family, exact=False)(input_ids=x, use_cache=False).logits  # float32 softmax and norms
        torch.testing.assert_close(own, base, rtol=0, atol=1e-5)
    want = definition(model, x, y, cut)
    vanilla = gradients(losses(model, x, y).sum(), list(model.parameters()))
    make_myopic(model, mode)
    logits = model(input_ids=x, use_cache=False).logits  # gradients on: the myopic path
    torch.testing.assert_close(logits, base, rtol=0, atol=1e-12)
    got = gradients(F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(), list(model.parameters()))
    assert relative_error(got, want) < 1e-10
    assert relative_error(vanilla, want) > 1e-3
    with torch.no_grad():  # evaluation through the wrapper: the same forward
        torch.testing.assert_close(model(input_ids=x, use_cache=False).logits, base, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_score_terms_need_the_reference_backend(family):
    model = make_myopic(build(family), "myopic", backend="fused")
    x, _ = data()
    with pytest.raises(ValueError, match="softcap/sinks.*backend='auto' or 'reference'"):
        model(input_ids=x, use_cache=False)


def test_unknown_attention_keyword_is_refused():
    model = make_myopic(build("llama"), "myopic")
    x, _ = data()
    with pytest.raises(ValueError, match=r"LlamaAttention passes attention keyword\(s\) new_feature"):
        model(input_ids=x, use_cache=False, new_feature=1.0)


@pytest.mark.parametrize("keyword,value,match", [
    ("is_causal", False, "bidirectional attention"),
    ("position_bias", torch.zeros(1, 4, T, T, dtype=torch.float64), "position_bias"),
])
def test_unsupported_attention_keywords_are_refused(keyword, value, match):
    model = make_myopic(build("llama"), "myopic")
    x, _ = data()
    with pytest.raises(ValueError, match=f"LlamaAttention.*{match}"):
        model(input_ids=x, use_cache=False, **{keyword: value})


def test_sliding_window_missing_from_the_mask_is_refused():
    from myopia.models.hf.myopic import myopia_attention_forward

    model = make_myopic(build("mistral"), "myopic_kv")
    module = attention_modules(model)[0]
    q = torch.zeros(1, 4, T, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="sliding window of 3"):
        myopia_attention_forward(module, q, q[:, :2], q[:, :2], None, sliding_window=3)


@pytest.mark.parametrize("mode", ["myopic", "myopic_kv"])
def test_training_with_a_kv_cache_prefix_is_refused(mode):
    model = make_myopic(build("gpt2"), mode)
    x, _ = data()

    def prefix():
        with torch.no_grad():
            return model(input_ids=x[:, :4], use_cache=True).past_key_values

    with pytest.raises(ValueError, match="KV-cache prefix"):
        model(input_ids=x[:, 4:], past_key_values=prefix(), use_cache=True)
    with torch.no_grad():  # without gradients the cached forward is the ordinary one
        got = model(input_ids=x[:, 4:], past_key_values=prefix(), use_cache=True).logits
        want = model(input_ids=x, use_cache=False).logits[:, 4:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["gemma2", "vaultgemma"])
def test_softcap_family_under_sdpa_is_refused_and_eager_is_exact(family):
    """transformers' SDPA path drops the logit soft-cap that its eager path (and myopia) apply: the two
    forwards differ, so make_myopic on an SDPA-loaded model would silently change it. Refused; eager is
    exact (the EXACT tests above)."""
    if family == "vaultgemma" and not hasattr(transformers, "VaultGemmaConfig"):
        pytest.skip("this transformers has no VaultGemma")
    if family == "vaultgemma":
        cfg = transformers.VaultGemmaConfig(head_dim=4, sliding_window=3, attn_logit_softcapping=5.0,
                                            query_pre_attn_scalar=8, **SMALL)
        cls = transformers.VaultGemmaForCausalLM
    else:
        cfg, cls = _config(family)
    torch.manual_seed(0)
    model = cls(cfg).double().eval()
    x, _ = data()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(30.0)  # scores of a few units, where a soft-cap of 5 bends them
        model.set_attn_implementation("eager")
        eager = model(input_ids=x, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=x, use_cache=False).logits
    assert (eager - sdpa).abs().max() > 1e-3  # the soft-cap bites, and SDPA leaves it out
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa'.*soft-capping.*attn_implementation='eager'"):
        make_myopic(model, "myopic")
    assert model.config._attn_implementation == "sdpa"  # refused before anything changed
    model.set_attn_implementation("eager")
    make_myopic(model, "myopic")
    with torch.no_grad():
        # transformers' eager takes the softmax and norms in float32: equal to that precision (exactness in
        # float64 is the EXACT tests' job)
        torch.testing.assert_close(model(input_ids=x, use_cache=False).logits, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_oss"])
def test_sink_families_never_run_sdpa(family):
    """Attention sinks: transformers itself refuses SDPA for these families, so the model's own forward
    always applies the sinks, as myopia does."""
    cfg, cls = _config(family)
    model = cls(cfg)
    with pytest.raises((ValueError, NotImplementedError)):
        model.set_attn_implementation("sdpa")
