"""myopia.GPT's myopic gradients against their definition, float64 (issue acceptance 1 and 3)."""

import pytest
import torch
import torch.nn.functional as F
from definition import gradients, mix_position, per_position_gradient, relative_error

from myopia import GPT, GPTConfig
from myopia.attention import Cut

T = 7


def tiny(position="learned", n_kv_head=None, n_layer=2, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=23, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head, n_embd=16,
                    block_size=16, position=position, **kw)
    return GPT(cfg).double()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 23, (3, T), generator=g)
    y = torch.randint(0, 23, (3, T), generator=g)
    return x, y


def loss_per_position(model, x, y, i=None):
    logits = model(x)
    ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
    return ce.sum() if i is None else ce[:, i].sum()


def definition(model, x, y, cut):
    """Σ_i ∂L_i/∂θ with positions j ≠ i cut at the attention input (hidden) or keys/values (kv)."""
    model.set_attention("vanilla")
    params = list(model.parameters())

    def install(i):
        handles = []
        for block in model.blocks:
            if cut == "hidden":
                handles.append(block.attn.register_forward_pre_hook(
                    lambda m, args, i=i: (mix_position(args[0], i, dim=1),) + args[1:]))
            else:
                for hook in (block.attn.hook_k, block.attn.hook_v):
                    handles.append(hook.register_forward_hook(
                        lambda m, args, out, i=i: mix_position(out, i, dim=2)))
        return handles

    return per_position_gradient(params, T, lambda i: loss_per_position(model, x, y, i), install)


def implementation(model, x, y, mode, backend, beta=0.0):
    model.set_attention(Cut(mode, beta=beta), backend=backend)
    return gradients(loss_per_position(model, x, y), list(model.parameters()))


CASES = [
    dict(position="learned"),
    dict(position="rotary"),
    dict(position="rotary", n_kv_head=2),
]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("shape", CASES, ids=["learned", "rotary", "rotary-gqa"])
@pytest.mark.parametrize("mode,cut", [("myopic", "hidden"), ("myopic_kv", "kv")])
def test_myopic_gradient_equals_definition(mode, cut, shape, backend):
    model = tiny(**shape)
    x, y = batch()
    want = definition(model, x, y, cut)
    got = implementation(model, x, y, mode, backend)
    assert relative_error(got, want) < 1e-10
    vanilla = implementation(model, x, y, "vanilla", backend)
    assert relative_error(vanilla, want) > 1e-3, "vanilla must differ from the myopic definition"


def test_hidden_and_kv_cuts_differ_only_in_projection_weights():
    model = tiny()
    x, y = batch()
    hidden = dict(zip([n for n, _ in model.named_parameters()], implementation(model, x, y, "myopic", "fused")))
    kv = dict(zip([n for n, _ in model.named_parameters()], implementation(model, x, y, "myopic_kv", "fused")))
    last_qkv = f"blocks.{len(model.blocks) - 1}.attn.c_attn.weight"
    assert not torch.allclose(hidden[last_qkv], kv[last_qkv])
    # In the last layer nothing but the key/value weights can tell the two cuts apart.
    for name in hidden:
        if name.startswith(f"blocks.{len(model.blocks) - 1}.") and "c_attn" not in name:
            torch.testing.assert_close(hidden[name], kv[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["myopic", "myopic_kv"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_beta_endpoints_and_linearity(mode, backend):
    model = tiny(n_layer=2)
    x, y = batch()
    myopic = implementation(model, x, y, mode, backend, beta=0.0)
    again = implementation(model, x, y, mode, backend, beta=0.0)
    assert all(torch.equal(a, b) for a, b in zip(myopic, again))
    vanilla = implementation(model, x, y, "vanilla", backend)
    beta_one = implementation(model, x, y, mode, backend, beta=1.0)
    assert relative_error(beta_one, vanilla) < 1e-12
    assert relative_error(myopic, vanilla) > 1e-3

    one_layer = tiny(n_layer=1)
    g0 = implementation(one_layer, x, y, mode, backend, beta=0.0)
    g1 = implementation(one_layer, x, y, mode, backend, beta=1.0)
    g_mid = implementation(one_layer, x, y, mode, backend, beta=0.3)
    assert relative_error(g_mid, [0.7 * a + 0.3 * b for a, b in zip(g0, g1)]) < 1e-12
    # With two layers a path that crosses positions twice is scaled by beta², so it is not linear.
    h0, h1, h_mid = (implementation(model, x, y, mode, backend, beta=b) for b in (0.0, 1.0, 0.3))
    assert relative_error(h_mid, [0.7 * a + 0.3 * b for a, b in zip(h0, h1)]) > 1e-6


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_forward_values_agree_across_modes(backend):
    model = tiny(position="rotary", n_kv_head=2)
    x, _ = batch()
    outs = {}
    for mode in ("vanilla", "myopic", "myopic_kv"):
        model.set_attention(mode, backend=backend)
        outs[mode] = model(x)
    torch.testing.assert_close(outs["myopic"], outs["vanilla"], rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["myopic_kv"], outs["vanilla"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_bigram_ignores_the_past(backend):
    model = tiny(attention="bigram", backend=backend)
    x, _ = batch()
    base = model(x)
    for i in range(1, T):
        changed = x.clone()
        changed[:, :i] = (changed[:, :i] + 5) % 23
        out = model(changed)
        torch.testing.assert_close(out[:, i:], base[:, i:], rtol=0, atol=0)
        assert not torch.allclose(out[:, :i], base[:, :i])
