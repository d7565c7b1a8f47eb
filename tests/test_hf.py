"""make_myopic on tiny random Hugging Face models (built from configs; nothing downloaded)."""

import pytest
import torch
import torch.nn.functional as F
from definition import (
    cut_module_input,
    gradients,
    mix_position,
    mix_window,
    per_position_gradient,
    relative_error,
    rows_with_window,
)

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from myopia.attention import Cut
from myopia.models.hf.myopic import attention_modules, make_myopic

from hf_tiny import COMMON, T, V, build, data, losses  # noqa: E402


def _kv_cut_function(i):
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        return sdpa_attention_forward(module, query, mix_position(key, i, 2), mix_position(value, i, 2),
                                      attention_mask, dropout, scaling, **kwargs)
    return fn


def definition(model, x, y, cut):
    make_myopic(model, "vanilla")
    params = list(model.parameters())
    modules = attention_modules(model)

    def install(i):
        if cut == "hidden":
            return cut_module_input(modules, i)
        AttentionInterface.register("kvcut", _kv_cut_function(i))
        AttentionMaskInterface.register("kvcut", sdpa_mask)
        model.set_attn_implementation("kvcut")

        class Restore:
            def remove(self):
                model.set_attn_implementation("sdpa")
        return [Restore()]

    return per_position_gradient(params, T, lambda i: losses(model, x, y)[:, i].sum(), install)


FAMILIES = ["gpt2", "neox", "llama-gqa", "qwen2"]


def window_definition(model, x, y, cut):
    """Σ_i L_i's gradient when, in the layers ``cut`` applies to, attention row i reads the cut input
    (hidden states for myopic, keys/values for myopic_kv) before i − horizon as constants: each
    row of the attention module's output is computed by its own forward (definition.py)."""
    cut = Cut.parse(cut)
    make_myopic(model, "vanilla")
    w = cut.effective_horizon
    row_now = {}

    def kv_window(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        i = row_now.get(id(module))
        if i is not None:
            key, value = mix_window(key, i, w, 2), mix_window(value, i, w, 2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    AttentionInterface.register("kvwindow", kv_window)
    AttentionMaskInterface.register("kvwindow", sdpa_mask)
    model.set_attn_implementation("kvwindow")
    patched = []
    for m in attention_modules(model):
        if cut.for_layer(m.layer_idx).is_vanilla:
            continue
        forward = m.forward

        def windowed(*args, m=m, forward=forward, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            rest = args[1:]

            def row(i):
                if cut.needs_past_kv:
                    return forward(mix_window(hidden, i, w, 1), *rest, **kwargs)[0]
                row_now[id(m)] = i
                try:
                    return forward(hidden, *rest, **kwargs)[0]
                finally:
                    row_now.pop(id(m))
            return rows_with_window(row, hidden.shape[1], dim=1), None

        m.forward = windowed
        patched.append(m)
    try:
        return gradients(losses(model, x, y).sum(), list(model.parameters()))
    finally:
        for m in patched:
            del m.forward
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,cut", [("myopic", "hidden"), ("myopic_kv", "kv")])
def test_hf_myopic_gradient_equals_definition(family, mode, cut, backend):
    model = build(family)
    x, y = data()
    want = definition(model, x, y, cut)
    make_myopic(model, mode, backend=backend)
    got = gradients(losses(model, x, y).sum(), list(model.parameters()))
    assert relative_error(got, want) < 1e-10
    make_myopic(model, "vanilla")
    vanilla = gradients(losses(model, x, y).sum(), list(model.parameters()))
    assert relative_error(vanilla, want) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_forward_unchanged_and_switch_back(family):
    model = build(family)
    x, _ = data()
    base = model(input_ids=x).logits
    for mode in ("myopic", "myopic_kv"):
        make_myopic(model, mode)
        torch.testing.assert_close(model(input_ids=x).logits, base, rtol=0, atol=1e-12)
    make_myopic(model, "vanilla")
    assert model.config._attn_implementation == "sdpa"
    assert all(not hasattr(m, "_myopia_state") for m in attention_modules(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_beta_one_is_vanilla(family):
    model = build(family)
    x, y = data()
    vanilla = gradients(losses(model, x, y).sum(), list(model.parameters()))
    make_myopic(model, "myopic", beta=1.0)
    got = gradients(losses(model, x, y).sum(), list(model.parameters()))
    assert relative_error(got, vanilla) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_bigram_ignores_the_past(family):
    model = make_myopic(build(family), "bigram")
    x, _ = data()
    base = model(input_ids=x).logits
    changed = x.clone()
    changed[:, :3] = (changed[:, :3] + 4) % V
    out = model(input_ids=changed).logits
    torch.testing.assert_close(out[:, 3:], base[:, 3:], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_generate_with_kv_cache_unchanged(family):
    model = build(family).float().eval()
    prompt = torch.tensor([[3, 7, 9, 2, 5]])
    kwargs = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=1)
    want = model.generate(prompt, **kwargs)
    for mode in ("myopic", "myopic_kv"):
        make_myopic(model, mode)
        assert torch.equal(model.generate(prompt, **kwargs), want)
    make_myopic(model, "vanilla")


def test_hf_padding_mask_fused_matches_reference():
    model = build("llama-gqa")
    x, y = data()
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    for cut in ("myopic", "myopic:h=2", "myopic_kv:h=3"):
        grads = {}
        for backend in ("fused", "reference"):
            make_myopic(model, cut, backend=backend)
            logits = model(input_ids=x, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, 2:].transpose(1, 2), y[:, 2:])
            grads[backend] = gradients(loss, list(model.parameters()))
        assert relative_error(grads["fused"], grads["reference"]) < 1e-10, cut


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cut", ["myopic:h=2", "myopic_kv:h=2", "myopic:layers=1", "myopic_kv:h=1:layers=0"])
def test_hf_horizon_and_layer_cuts_equal_definition(family, cut, backend):
    model = build(family)
    x, y = data()
    want = window_definition(model, x, y, cut)
    make_myopic(model, cut, backend=backend)
    got = gradients(losses(model, x, y).sum(), list(model.parameters()))
    assert relative_error(got, want) < 1e-10
    parsed = Cut.parse(cut)
    for other in ("vanilla", parsed.mode):
        make_myopic(model, other, backend=backend)
        assert relative_error(gradients(losses(model, x, y).sum(), list(model.parameters())), want) > 1e-3, other
    make_myopic(model, "vanilla")


def test_hf_window_definition_at_zero_is_the_per_position_definition():
    model = build("llama-gqa")
    x, y = data()
    for mode, cut in (("myopic", "hidden"), ("myopic_kv", "kv")):
        assert relative_error(window_definition(model, x, y, f"{mode}:h=0"), definition(model, x, y, cut)) < 1e-10


def test_hf_cut_naming_a_missing_layer_is_a_one_line_error():
    from myopia.attention import CutError

    with pytest.raises(CutError, match="LlamaForCausalLM with 2 attention layers.*layer 4 does not exist"):
        make_myopic(build("llama-gqa"), "myopic:layers=4")
