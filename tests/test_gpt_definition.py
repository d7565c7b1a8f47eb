"""myopia.GPT's myopic gradients against their definition, float64 (issue acceptance 1 and 3)."""

import pytest
import torch
import torch.nn.functional as F
from definition import gradients, mix_position, mix_window, per_position_gradient, relative_error, rows_with_window

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


def definition(model, x, y, cut, loss=loss_per_position):
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

    return per_position_gradient(params, T, lambda i: loss(model, x, y, i), install)


def window_definition(model, x, y, cut):
    """The gradient of Σ_i L_i when, in every layer ``cut`` applies to, attention row i reads the cut
    input (attention input for ``myopic``, keys/values for ``myopic_kv``) at positions before
    i − horizon as constants (definition.py, ``rows_with_window``)."""
    cut = Cut.parse(cut)
    model.set_attention("vanilla")
    w = cut.effective_horizon
    patched = []
    for index, block in enumerate(model.blocks):
        if cut.for_layer(index).is_vanilla:
            continue
        attn, forward = block.attn, block.attn.forward

        def windowed(x, past=None, attn=attn, forward=forward):
            def row(i):
                if cut.needs_past_kv:
                    return forward(mix_window(x, i, w, dim=1))
                hooks = [h.register_forward_hook(lambda m, a, out: mix_window(out, i, w, dim=2))
                         for h in (attn.hook_k, attn.hook_v)]
                try:
                    return forward(x)
                finally:
                    for h in hooks:
                        h.remove()
            return rows_with_window(row, x.shape[1], dim=1)

        attn.forward = windowed
        patched.append(attn)
    try:
        return gradients(loss_per_position(model, x, y), list(model.parameters()))
    finally:
        for attn in patched:
            del attn.forward


def implementation(model, x, y, mode, backend, beta=0.0, loss=loss_per_position):
    model.set_attention(Cut.parse(mode).with_beta(beta), backend=backend)
    return gradients(loss(model, x, y), list(model.parameters()))


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


def huber_per_position(model, x, y, i=None):
    out = F.huber_loss(model(x).squeeze(-1), y, reduction="none")  # (B, T)
    return out.sum() if i is None else out[:, i].sum()


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("mode,cut", [("myopic", "hidden"), ("myopic_kv", "kv")])
def test_synthetic_cpu_model_myopic_gradient_equals_definition(mode, cut, backend):
    """The synthetic cpu preset's model: continuous (x, z) input, rotary positions, every Linear at
    PyTorch's default initialisation, a regression head under the Huber loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, input_dim=2, output_dim=1,
                          activation="relu", position="rotary", init="torch-default",
                          io_init="torch-default")).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, T, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, T, generator=g, dtype=torch.float64)
    want = definition(model, x, y, cut, loss=huber_per_position)
    got = implementation(model, x, y, mode, backend, loss=huber_per_position)
    assert relative_error(got, want) < 1e-10
    vanilla = implementation(model, x, y, "vanilla", backend, loss=huber_per_position)
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


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("shape", [CASES[0], CASES[2]], ids=["learned", "rotary-gqa"])
@pytest.mark.parametrize("cut", ["myopic:h=1", "myopic:h=3", "myopic_kv:h=1", "myopic_kv:h=3"])
def test_horizon_gradient_equals_definition(cut, shape, backend):
    model = tiny(**shape)
    x, y = batch()
    want = window_definition(model, x, y, cut)
    got = implementation(model, x, y, cut, backend)
    assert relative_error(got, want) < 1e-10
    for other in ("vanilla", cut.split(":")[0]):  # the horizon must matter both ways
        assert relative_error(implementation(model, x, y, other, backend), want) > 1e-3, other


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("cut", ["myopic:layers=0", "myopic:layers=2", "myopic:layers=0+2",
                                 "myopic_kv:layers=1", "myopic_kv:h=2:layers=1-2", "myopic:h=1:layers=0"])
def test_per_layer_cut_equals_definition(cut, backend):
    model = tiny(position="rotary", n_kv_head=2, n_layer=3)
    x, y = batch()
    want = window_definition(model, x, y, cut)
    got = implementation(model, x, y, cut, backend)
    assert relative_error(got, want) < 1e-10
    everywhere = Cut.parse(cut).spec.split(":layers")[0]
    for other in ("vanilla", everywhere):
        assert relative_error(implementation(model, x, y, other, backend), want) > 1e-3, other


@pytest.mark.parametrize("mode,cut", [("myopic", "hidden"), ("myopic_kv", "kv")])
def test_window_definition_at_horizon_zero_is_the_per_position_definition(mode, cut):
    """The two literal definitions (per loss position, per attention row) agree where they must."""
    model = tiny(position="rotary", n_kv_head=2)
    x, y = batch()
    assert relative_error(window_definition(model, x, y, f"{mode}:h=0"), definition(model, x, y, cut)) < 1e-10


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_horizon_endpoints_are_exact(backend):
    model = tiny(position="rotary", n_kv_head=2)
    x, y = batch()
    for mode in ("myopic", "myopic_kv"):
        plain = implementation(model, x, y, mode, backend)
        assert all(torch.equal(a, b) for a, b in zip(implementation(model, x, y, f"{mode}:h=0", backend), plain))
        vanilla = implementation(model, x, y, "vanilla", backend)
        for horizon in (T - 1, 50):
            got = implementation(model, x, y, f"{mode}:h={horizon}", backend)
            assert all(torch.equal(a, b) for a, b in zip(got, vanilla)), (mode, horizon)


def test_bad_cuts_are_one_line_errors():
    from myopia.attention import CutError

    with pytest.raises(CutError, match="layer 5 does not exist"):
        tiny(attention="myopic:layers=5")
    model = tiny()
    for bad, message in (("myopic:h=-2", "horizon -2"), ("myopic:depth=3", "unknown option 'depth=3'"),
                         ("bigram:h=2", "a horizon needs a myopic mode"), ("myopic@1.5", "beta=1.5"),
                         ("myopic:layers=9", "does not exist")):
        with pytest.raises(CutError, match=message) as info:
            model.set_attention(bad)
        assert "\n" not in str(info.value)
