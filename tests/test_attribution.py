"""Per-feature attribution (myopia.analysis.attribution): each part equals its definition by brute
force in float64 (separate backward passes with explicit stop-gradients, one per loss), the parts sum
to the full gradient, nothing is pre-cached at the last position, a myopic model's own gradient has
no pre-cached part at all (and where that holds by construction), and on every arm a push is the
finite difference of the feature's reading under the part's update."""

import pytest
import torch
import torch.nn.functional as F
from definition import gradients, relative_error

from myopia import GPT, GPTConfig
from myopia.analysis.attribution import (
    adam_preconditioner,
    feature_pushes,
    model_cut,
    precached_is_zero_by_construction,
    residual_blocks,
    split_gradient,
)
from myopia.attention.cut import Cut

B, T = 3, 6


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, n_layer=3, n_head=2, n_embd=8, block_size=T)).double()


def _data(vocab=11):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def _ce(out, y):
    out = getattr(out, "logits", out)
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none")


def _losses(model, x, y, layer, position, detach):
    """Per-position losses with the state entering block ``layer`` at ``position`` detached (or not)."""
    def pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        keep = (torch.arange(h.shape[1]) == position).view(1, -1, 1)
        h = torch.where(keep, h.detach(), h)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = residual_blocks(model)[layer].register_forward_pre_hook(pre, with_kwargs=True) if detach else None
    try:
        return _ce(model(x), y)
    finally:
        if handle is not None:
            handle.remove()


def brute_force(model, x, y, layer, position):
    params = [p for p in model.parameters() if p.requires_grad]
    n = B * T
    through = []
    for s in range(T):  # the part of ∇L_s that passes through h: with h live minus with h constant
        live = gradients(_losses(model, x, y, layer, position, False)[:, s].sum() / n, params)
        cut = gradients(_losses(model, x, y, layer, position, True)[:, s].sum() / n, params)
        through.append([a - b for a, b in zip(live, cut)])
    assert all(max(float(g.abs().max()) for g in through[s]) == 0 for s in range(position))  # causal
    direct = through[position]
    precached = [sum(parts) for parts in zip(*through[position + 1:])] if position + 1 < T else \
        [torch.zeros_like(p) for p in params]
    shared = gradients(_losses(model, x, y, layer, position, True).sum() / n, params)
    full = gradients(_losses(model, x, y, layer, position, False).sum() / n, params)
    return direct, precached, shared, full


@pytest.mark.parametrize("layer,position", [(0, 2), (1, 0), (2, 3)])
def test_parts_equal_their_definitions_and_sum_to_the_gradient(layer, position):
    model, (x, y) = _gpt(), _data()
    split = split_gradient(model, x, y, _ce, layer, position)
    direct, precached, shared, full = brute_force(model, x, y, layer, position)
    assert relative_error(split.direct, direct) < 1e-10
    assert relative_error(split.precached, precached) < 1e-10
    assert relative_error(split.shared, shared) < 1e-10
    assert relative_error(split.total(), full) < 1e-10
    assert relative_error(precached, direct) > 1e-2  # the parts differ: each check can fail


def test_nothing_is_precached_at_the_last_position():
    model, (x, y) = _gpt(), _data()
    split = split_gradient(model, x, y, _ce, 1, T - 1)
    assert all(float(g.abs().max()) == 0 for g in split.precached)
    assert max(float(g.abs().max()) for g in split.direct) > 0


@pytest.mark.parametrize("layer", [0, 2])
def test_a_myopic_models_own_gradient_has_no_precached_part(layer):
    model, (x, y) = _gpt(), _data()
    vanilla = split_gradient(model, x, y, _ce, layer, 1)
    assert max(float(g.abs().max()) for g in vanilla.precached) > 1e-4
    model.set_attention("myopic")
    myopic = split_gradient(model, x, y, _ce, layer, 1)
    assert all(float(g.abs().max()) == 0 for g in myopic.precached)  # exactly: what the cut removes


def test_a_hugging_face_model_splits_the_same_way():
    from hf_tiny import build

    model = build("llama")
    x, y = _data(vocab=23)
    split = split_gradient(model, x, y, _ce, 1, 2)
    direct, precached, shared, full = brute_force(model, x, y, 1, 2)
    # transformers computes RMSNorm in float32 inside the float64 model: equal to float32's precision
    for got, want in ((split.direct, direct), (split.precached, precached), (split.shared, shared)):
        assert relative_error(got, want) < 1e-6
    assert relative_error(precached, direct) > 1e-2


def test_feature_pushes_add_up_and_adam_preconditions():
    model, (x, y) = _gpt(), _data()
    split = split_gradient(model, x, y, _ce, 1, 2)
    w = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pushes = feature_pushes(split, w)
    direction = split.feature_grad(w)
    total = -sum(float((a * b).sum()) for a, b in zip(direction, split.total()))
    assert pushes["direct"] + pushes["precached"] + pushes["shared"] == pytest.approx(total, rel=1e-10)
    assert -1 <= pushes["precaching_score"] <= 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    assert adam_preconditioner(opt, split.params) is None  # no moments before the first step
    model(x).sum().backward()
    before = [p.detach().clone() for p in split.params]
    opt.step()
    # AdamW's first step is lr * g / (sqrt(g^2) + eps): the preconditioner times the gradient it saw
    pre = adam_preconditioner(opt, split.params)
    for p, p0, c in zip(split.params, before, pre):
        torch.testing.assert_close(p0 - p.detach(), 1e-3 * p.grad * c, rtol=1e-6, atol=1e-12)
    split = split_gradient(model, x, y, _ce, 1, 2)  # at the new weights
    plain, adam = feature_pushes(split, w), feature_pushes(split, w, adam_preconditioner(opt, split.params))
    assert adam["precached"] != plain["precached"] and adam["direct"] != plain["direct"]
    # first order: a small plain step along the pre-cached part moves w·h by lr × its push
    with torch.no_grad():
        h0 = _state(model, x, 1, 2) @ w
        for p, g in zip(split.params, split.precached):
            p -= 1e-6 * g
        h1 = _state(model, x, 1, 2) @ w
    assert float((h1 - h0).sum()) / 1e-6 == pytest.approx(plain["precached"], rel=1e-4)


def _state(model, x, layer, position):
    _, hidden = model(x, return_hidden_states=True)
    return hidden[layer][:, position]


def _wide_gpt(attention):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, n_layer=3, n_head=2, n_embd=16, block_size=T, attention=attention)).double()


def _entering(model, x, layer, position):
    """The residual stream entering block ``layer`` at ``position`` (any model with blocks), no graph."""
    seen = {}

    def read(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"])[:, position]

    handle = residual_blocks(model)[layer].register_forward_pre_hook(read, with_kwargs=True)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["h"]


def _fd_push(model, x, layer, position, w, targets, update, eps=1e-5):
    """The first-order change under the step −update, by central differences: of Σ_b w·h_b, or with
    ``targets`` the decrease of ½ Σ_b (w·h_b − τ_b)²."""
    def reading(sign):
        with torch.no_grad():
            for p, g in zip(model.parameters(), update):
                p.add_(sign * eps * g)
            value = _entering(model, x, layer, position) @ w
            for p, g in zip(model.parameters(), update):
                p.sub_(sign * eps * g)
        return float(value.sum()) if targets is None else -0.5 * float(((value - targets) ** 2).sum())

    return (reading(-1) - reading(1)) / (2 * eps)


@pytest.mark.parametrize("arm", ["vanilla", "myopic", "myopic_kv", "myopic:h=1", "myopic:layers=1", "myopic@0.5"])
def test_a_push_is_the_finite_difference_of_the_reading_on_every_arm(arm):
    """A push is the first-order change of the feature's reading under the update a part makes. The
    forward is the same under every cut, so the reading's change runs through the ordinary (uncut)
    graph, whichever cut produced the update: on a cut arm the direction must not come from the cut
    graph (through it, the myopic arm's direct push at layer 2 read −1.35 where the reading moves by −1.41)."""
    model, (x, y) = _wide_gpt(arm), _data()
    g = torch.Generator().manual_seed(6)
    w, t = torch.randn(16, dtype=torch.float64, generator=g), torch.randn(B, dtype=torch.float64, generator=g)
    layer, position = 2, 3
    split = split_gradient(model, x, y, _ce, layer, position)
    assert split.params == list(model.parameters())
    reported = [(targets, feature_pushes(split, w, targets=targets)) for targets in (None, t)]  # before any move
    for targets, pushes in reported:
        for part in ("direct", "precached", "shared"):
            want = _fd_push(model, x, layer, position, w, targets, split.part(part))
            assert pushes[part] == pytest.approx(want, rel=1e-7, abs=1e-9), (part, targets is None)
    assert model.attention_cut() == Cut.parse(arm)  # switched back


def test_a_hugging_face_models_push_is_the_finite_difference_too():
    """The same on a transformers model that ``make_myopic`` cut (its cut and backend restored after)."""
    from hf_tiny import build

    from myopia.models.hf.myopic import attention_modules, current_cut, make_myopic

    model = make_myopic(build("llama"), "myopic", backend="reference")
    x, y = _data(vocab=23)
    w = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    split = split_gradient(model, x, y, _ce, 1, 2)
    pushes = feature_pushes(split, w)
    assert current_cut(model) == Cut.parse("myopic")
    assert {m._myopia_state.backend for m in attention_modules(model)} == {"reference"}
    # transformers computes RMSNorm in float32 inside the float64 model: a wider step, a looser match
    for part in ("direct", "shared"):
        want = _fd_push(model, x, 1, 2, w, None, split.part(part), eps=1e-3)
        assert pushes[part] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("arm,layer,claimed", [
    ("myopic", 1, True), ("myopic_kv", 0, True), ("myopic:h=0", 2, True), ("bigram", 1, True),
    ("myopic:layers=1-2", 1, True), ("myopic:layers=1-2", 0, False), ("myopic:layers=1", 1, False),
    ("myopic@0.5", 1, False), ("myopic:h=1", 1, False), ("myopic@1", 1, False), ("vanilla", 1, False),
])
def test_zero_by_construction_is_claimed_exactly_where_the_split_is_zero(arm, layer, claimed):
    """The pre-cached part is zero by construction only where every block from the layer on cuts
    every past edge: not under myopic@β, a horizon or a cut that leaves a later block vanilla."""
    model, (x, y) = _wide_gpt(arm), _data()
    assert model_cut(model) == Cut.parse(arm)
    assert precached_is_zero_by_construction(Cut.parse(arm), layer, 3) is claimed
    split = split_gradient(model, x, y, _ce, layer, 1)
    assert all(float(g.abs().max()) == 0 for g in split.precached) is claimed
