"""Which part of the gradient trains a hidden state's features: direct, pre-cached and shared.

For one state h, the residual stream entering block ``layer`` at ``position`` t (TransformerLens's
``blocks.{layer}.hook_resid_pre``), and the loss L = mean over the batch and positions of L_s, the
parameter gradient splits exactly into (Rofin, Naghiyev & Hahn, ICLR 2026, whose myopic baseline,
detaching past keys and values, is our ``myopic_kv``; docs/attribution.md):

- **shared**: ∇θL with h replaced by a constant at every reader (position t's own later layers
  included): everything that does not pass through h;
- **direct**: the part that passes through h and comes from L_t;
- **pre-cached**: the part that passes through h and comes from later losses L_s, s > t (earlier
  losses cannot reach h in a causal model).

direct + pre-cached + shared = ∇θL. The through-h parts are computed as ∂L_S/∂h (h made a leaf
where the rest of the network reads it) pulled back through h's own graph: three backward passes, not
one per loss. The gradient is the model's own, under its cut: in a model cut with plain ``myopic`` or
``myopic_kv`` in every block from ``layer`` on (β = 0, no horizon) the pre-cached part is exactly zero,
since later positions read h only through attention inputs (or keys and values) that are constants
(:func:`precached_is_zero_by_construction`).

A *feature* is a direction w read from h (a probe; or several, a ``(d, k)`` matrix such as a
multi-class probe, scored together). A part's **push** on it is the first-order change
of Σ_batch w·h under the update that part alone would make: a plain gradient step (−g) or AdamW's step
with the optimiser's current second moment as the preconditioner (−g / (√v̂ + ε)). The forward pass
is the same under every cut but ``bigram``, so how an update moves h is ∇θ(w·h) through the ordinary,
uncut graph, whichever cut made the update: on a cut model h is read once more through vanilla
attention for this direction (:func:`split_gradient`). With per-example
target values t (the feature's true values, or a reference model's w·h: Rofin et al.'s variant) the
push is instead the first-order decrease of ½ Σ_batch (w·h − t)², i.e. how far the update moves the
feature *towards* its targets. The pre-caching score is the pre-cached push as a share of the
through-h pushes (:func:`feature_pushes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from myopia.attention.cut import MYOPIC_MODES, VANILLA, Cut

PARTS = ("direct", "precached", "shared")


@dataclass
class GradientSplit:
    """The parameter gradient of one loss split at one state, each part a list aligned with ``params``."""

    layer: int
    position: int
    params: list[nn.Parameter]
    values: torch.Tensor
    """h itself, ``(B, d)``, detached."""
    direct: list[torch.Tensor]
    precached: list[torch.Tensor]
    shared: list[torch.Tensor]
    feature_grad: Callable[..., list[torch.Tensor]]
    """``feature_grad(w, coefficients=None)``: ∇θ of Σ_batch Σ_j c_bj (wᵀh_b)_j for w of shape ``(d,)``
    or ``(d, k)`` and c of shape ``(B,)`` or ``(B, k)`` (all ones by default), the direction in parameter
    space that moves feature w: through the ordinary attention graph, not the model's cut (a cut drops
    gradient terms, not the forward's dependence on θ)."""

    def total(self) -> list[torch.Tensor]:
        return [d + p + s for d, p, s in zip(self.direct, self.precached, self.shared)]

    def part(self, name: str) -> list[torch.Tensor]:
        if name not in PARTS:
            raise ValueError(f"part {name!r} is not one of {', '.join(PARTS)}")
        return getattr(self, name)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules whose first input is the residual stream, block by block: our GPT's ``blocks``, a
    transformers model's decoder layers."""
    from myopia.train.distributed import shard_units

    blocks = shard_units(getattr(model, "hf", model))
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no blocks found to read the residual stream from; "
                         "attribution supports myopia's GPT and transformers decoder models")
    return blocks


def _zeros_for_none(grads, params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


class _StateRead(Exception):
    """Ends a forward pass once the state it was run for has been read."""


def _attention_switch(model: nn.Module) -> tuple[Cut, Callable[[Cut], object]] | None:
    """The model's gradient cut and a function that sets another: myopia's GPT and ``HFCausalLM``
    (``attention_cut``, ``set_attention``), or a transformers model that ``make_myopic`` switched (its
    backend kept); None for any other model, whose graph is its forward's own."""
    if callable(getattr(model, "attention_cut", None)) and callable(getattr(model, "set_attention", None)):
        return model.attention_cut(), model.set_attention
    cut = getattr(model, "_myopia_cut", None)
    if cut is None:
        return None
    from myopia.models.hf.myopic import attention_modules, make_myopic

    backend = attention_modules(model)[0]._myopia_state.backend
    return cut, lambda c: make_myopic(model, c, backend=backend)


def model_cut(model: nn.Module) -> Cut | None:
    """The gradient cut ``model`` trains with (vanilla if none was set); None for a model without cuts
    (neither myopia's nor one ``make_myopic`` switched)."""
    switch = _attention_switch(model)
    return None if switch is None else switch[0]


def precached_is_zero_by_construction(cut: Cut, layer: int, n_blocks: int) -> bool:
    """Whether a model of ``n_blocks`` blocks cut with ``cut`` has, at every position, a pre-cached
    part of exactly zero at the state entering block ``layer``: every block from ``layer`` on cuts
    every past edge (``myopic`` or ``myopic_kv`` with β = 0 and no horizon) or reads no past at all
    (``bigram``), so no later loss reaches h or what it becomes. Not under β > 0 (part of the
    crossing gradient kept), a horizon (edges within it kept) or a block from ``layer`` on left vanilla."""
    def blocks_the_past(c: Cut) -> bool:
        return c.mode == "bigram" or (c.mode in MYOPIC_MODES and c.beta == 0 and c.effective_horizon == 0)

    return all(blocks_the_past(cut.for_layer(i)) for i in range(layer, n_blocks))


def _state_through_uncut_graph(model: nn.Module, block: nn.Module, x: torch.Tensor, position: int
                               ) -> torch.Tensor | None:
    """h (the residual stream entering ``block`` at ``position``) with its graph back to the parameters
    through ordinary attention: one forward pass up to ``block`` with the model switched to vanilla, then
    switched back. Under a cut that drops gradient terms the forward value is the same but the graph
    misses the dropped paths, so this is what moves h under an update. None where the model's own graph
    already is the ordinary one (vanilla, bigram, a model without cuts)."""
    switch = _attention_switch(model)
    if switch is None or not switch[0].cuts_gradient:
        return None
    cut, set_cut = switch
    state: dict[str, torch.Tensor] = {}

    def read(module, args, kwargs):
        state["h"] = (args[0] if args else kwargs["hidden_states"])[:, position]
        raise _StateRead

    handle = block.register_forward_pre_hook(read, with_kwargs=True)
    try:
        set_cut(VANILLA)
        model(x)
    except _StateRead:
        pass
    finally:
        handle.remove()
        set_cut(cut)
    return state["h"]


def split_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_per_position: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    layer: int,
    position: int,
    params: list[nn.Parameter] | None = None,
) -> GradientSplit:
    """Split ∇θ of mean(``loss_per_position(model(x), y)``) (a ``(B, T)`` tensor) at the residual
    stream entering block ``layer`` at ``position`` (see the module docstring). The parts are the
    model's own gradient under its cut; a model whose cut drops gradient terms is switched to vanilla for
    one more forward pass up to ``layer`` (the feature direction's graph) and back to its cut."""
    blocks = residual_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer={layer} is outside 0..{len(blocks) - 1} (the residual stream entering each block)")
    T = x.shape[1]
    if not 0 <= position < T:
        raise ValueError(f"position={position} is outside 0..{T - 1} for sequences of {T} tokens")
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    state: dict[str, torch.Tensor] = {}

    def replace_with_leaf(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        state["h"] = h[:, position]  # keeps its graph back to the parameters
        state["leaf"] = h[:, position].detach().requires_grad_(True)
        h = torch.cat([h[:, :position], state["leaf"].unsqueeze(1), h[:, position + 1:]], dim=1)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = blocks[layer].register_forward_pre_hook(replace_with_leaf, with_kwargs=True)
    try:
        out = model(x)
    finally:
        handle.remove()
    uncut = _state_through_uncut_graph(model, blocks[layer], x, position)
    out = getattr(out, "logits", out)
    losses = loss_per_position(out, y)
    scale = 1.0 / losses.numel()
    h, leaf = state["h"], state["leaf"]
    shared = _zeros_for_none(torch.autograd.grad(losses.sum() * scale, params, retain_graph=True,
                                                 allow_unused=True), params)
    here = torch.autograd.grad(losses[:, position].sum() * scale, leaf, retain_graph=True)[0]
    later = None
    if position + 1 < T:  # None where no later loss reads h at all (a myopic model)
        later = torch.autograd.grad(losses[:, position + 1:].sum() * scale, leaf, retain_graph=True,
                                    allow_unused=True)[0]
    later = torch.zeros_like(leaf) if later is None else later

    def pull_back(g: torch.Tensor) -> list[torch.Tensor]:
        return _zeros_for_none(torch.autograd.grad(h, params, grad_outputs=g, retain_graph=True, allow_unused=True),
                               params)

    def feature_grad(w: torch.Tensor, coefficients: torch.Tensor | None = None) -> list[torch.Tensor]:
        w2 = w.to(h.dtype).reshape(w.shape[0], -1)  # (d, k)
        c = torch.ones(h.shape[0], w2.shape[1], dtype=h.dtype, device=h.device) if coefficients is None \
            else coefficients.to(h.dtype).reshape(h.shape[0], -1)
        if uncut is None:
            return pull_back(c @ w2.T)
        return _zeros_for_none(torch.autograd.grad(uncut, params, grad_outputs=c @ w2.T, retain_graph=True,
                                                   allow_unused=True), params)

    return GradientSplit(layer=layer, position=position, params=params, values=h.detach(), direct=pull_back(here),
                         precached=pull_back(later), shared=shared, feature_grad=feature_grad)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((u.double() * v.double()).sum() for u, v in zip(a, b)))


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
    """1 / (√v̂ + ε) per parameter from an Adam(W) optimiser's current second moments (None before
    its first step)."""
    out = []
    for p in params:
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st:
            return None
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        beta2, eps = group["betas"][1], group["eps"]
        step = float(st["step"])
        v_hat = st["exp_avg_sq"] / (1.0 - beta2 ** step)
        out.append(1.0 / (v_hat.sqrt() + eps))
    return out


def feature_pushes(split: GradientSplit, w: torch.Tensor,
                   preconditioner: list[torch.Tensor] | None = None,
                   targets: torch.Tensor | None = None) -> dict[str, float]:
    """Each part's push on feature w (``(d,)``, or ``(d, k)`` for k directions scored together) per
    unit learning rate, under the update −part (or −part · ``preconditioner``, AdamW's step): the
    first-order change of Σ_batch w·h (summed over the k directions), or with ``targets`` (``(B,)``,
    or ``(B, k)``) the first-order decrease of ½ Σ_batch ‖wᵀh − target‖², i.e. the move towards the
    targets. And the pre-caching score: pre-cached push / (|direct push| + |pre-cached push|), in
    [−1, 1]."""
    coefficients = None
    if targets is not None:
        expected = split.values.shape[:1] + w.shape[1:]
        if targets.shape != expected:
            raise ValueError(f"targets has shape {tuple(targets.shape)}; expected one value per example and "
                             f"direction, {tuple(expected)}")
        coefficients = targets.to(split.values.dtype) - split.values @ w.to(split.values.dtype)
    direction = split.feature_grad(w, coefficients)
    pushes = {}
    for name in PARTS:
        part = split.part(name)
        if preconditioner is not None:
            part = [g * c for g, c in zip(part, preconditioner)]
        pushes[name] = 0.0 - _dot(direction, part)  # a zero part pushes by 0, not −0
    through = abs(pushes["direct"]) + abs(pushes["precached"])
    pushes["precaching_score"] = pushes["precached"] / through if through > 0 else 0.0
    return pushes


__all__ = ["PARTS", "GradientSplit", "adam_preconditioner", "feature_pushes", "model_cut",
           "precached_is_zero_by_construction", "residual_blocks", "split_gradient"]
