"""Myopic training for Hugging Face causal LMs: ``make_myopic(model, mode)``.

Works for every family whose attention goes through transformers' ``AttentionInterface`` (GPT-2,
GPT-NeoX/Pythia, Llama, Mistral, Qwen2, ...). No HF forward code is copied: myopia registers an
attention function named ``"myopia"`` and selects it through the model's attention implementation.

- ``myopic_kv`` and ``bigram`` need nothing more: the attention function sees the live, projected
  and rotated keys/values and gives them the mode's gradient (or, for bigram, its forward).
- ``myopic`` (the paper's cut) needs the keys/values of the *detached* attention input through the
  live weights. Each attention module's forward is wrapped to run twice while gradients are on: first
  a *record* pass on the detached input (no KV cache), where the attention function only records the
  keys/values it is given and returns zeros; then the live pass, where those recorded keys/values
  carry the cross-position gradient to the weights. No projection runs twice: during the record pass
  each input projection (a Linear/Conv1D child of the attention module applied to its input) computes
  its output once, as a live copy (kept for the live pass) and a copy whose gradient reaches only the
  weights (handed to the record pass); the output projection returns zeros without a matmul. Rotary
  and reshapes run twice (element-wise, cheap).

Without gradients (evaluation, ``generate`` with a KV cache) the forward is the ordinary one, since
the forward values of vanilla, myopic and myopic_kv attention are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from myopia.attention import VANILLA, Cut, attention, expand_kv
from myopia.attention.cut import check_backend
from myopia.attention.projection import project_with_weight_only_copy

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "myopia.hf needs the Hugging Face extra: pip install 'myopia[hf]' (transformers)"
    ) from exc

ATTENTION_NAME = "myopia"
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")


@dataclass
class _LayerState:
    cut: Cut  # this layer's cut (already resolved for its layer index)
    backend: str
    phase: str | None = None  # "record" | "live" while the myopic mode's wrapped forward runs
    k_past: torch.Tensor | None = None
    v_past: torch.Tensor | None = None
    x_live: torch.Tensor | None = None  # the attention input of the current call
    x_detached: torch.Tensor | None = None  # its detached copy, given to the record pass
    projected: dict[int, torch.Tensor] | None = None  # live projection outputs from the record pass


def myopia_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (registered as ``"myopia"``)."""
    state: _LayerState | None = getattr(module, "_myopia_state", None)
    if state is None or state.cut.is_vanilla:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if state.phase == "record":
        state.k_past, state.v_past = key, value
        B, H, T, D = query.shape
        return query.new_zeros(B, T, H, value.shape[-1]), None
    q_len, k_len = query.shape[2], key.shape[2]
    if state.cut.changes_forward:
        out = expand_kv(value[:, :, k_len - q_len :], query.shape[1] // key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    k_past, v_past = state.k_past, state.v_past
    state.k_past = state.v_past = None
    if q_len != k_len or not torch.is_grad_enabled():
        # Decoding with a cache, or no gradient: the forward value is the ordinary one.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    cut = state.cut
    if cut.needs_past_kv and k_past is None:
        raise RuntimeError(
            f"{type(module).__name__} was called with cut {cut.spec!r} without its detached pass; call the "
            "model (not the attention function) or re-run make_myopic(model, ...)")
    mask = attention_mask
    if mask is not None:
        mask = mask[..., :k_len]
    out = attention(
        query, key, value, cut=cut, scale=scaling, attn_mask=mask, k_past=k_past, v_past=v_past,
        backend=state.backend, dropout_p=dropout,
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, myopia_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _detached_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        args = (args[0].detach(),) + tuple(args[1:])
    else:
        kwargs["hidden_states"] = kwargs["hidden_states"].detach()
    for name in _CACHE_ARGUMENTS:
        if name in kwargs:
            kwargs[name] = None
    kwargs.pop("use_cache", None)
    return args, kwargs


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # transformers' GPT-2 Conv1D


def _projections(module: nn.Module) -> list[nn.Module]:
    """The input/output projections among ``module``'s children; for a PEFT (LoRA) layer, its base
    layer: it receives the layer's input unchanged, and the low-rank branch beside it then runs on
    the input each pass gives it (detached in the record pass), so it gets the myopic gradient too."""
    found = []
    for child in module.children():
        base = getattr(child, "base_layer", None)
        if _is_projection(child):
            found.append(child)
        elif isinstance(base, nn.Module) and _is_projection(base):
            found.append(base)
    return found


def _weight_and_bias(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(m, nn.Linear):
        return m.weight, m.bias
    return m.weight.t(), m.bias  # Conv1D keeps its weight as (in, out)


def _wrap_projection(proj: nn.Module, owner: nn.Module) -> None:
    if getattr(proj, "_myopia_original_forward", None) is not None:
        return
    original = proj.forward

    def forward(x, *args, **kwargs):
        state: _LayerState | None = getattr(owner, "_myopia_state", None)
        if state is None or state.phase is None:
            return original(x, *args, **kwargs)
        if state.phase == "record":
            if x is state.x_detached:
                weight, bias = _weight_and_bias(proj)
                y_live, y_weight_only = project_with_weight_only_copy(state.x_live, weight, bias)
                state.projected[id(proj)] = y_live
                return y_weight_only
            out_features = _weight_and_bias(proj)[0].shape[0]
            return x.new_zeros(*x.shape[:-1], out_features)  # the output projection of zeros
        if state.phase == "live" and x is state.x_live and id(proj) in state.projected:
            return state.projected.pop(id(proj))
        return original(x, *args, **kwargs)

    proj._myopia_original_forward = original
    proj.forward = forward


def _wrap_forward(module: nn.Module) -> None:
    if getattr(module, "_myopia_original_forward", None) is not None:
        return
    original = module.forward
    for child in _projections(module):
        _wrap_projection(child, module)

    def forward(*args, **kwargs):
        state: _LayerState = module._myopia_state
        if not state.cut.needs_past_kv or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        d_args, d_kwargs = _detached_call(args, kwargs)
        state.x_live = args[0] if args else kwargs["hidden_states"]
        state.x_detached = d_args[0] if d_args else d_kwargs["hidden_states"]
        state.projected = {}
        try:
            state.phase = "record"
            original(*d_args, **d_kwargs)
            state.phase = "live"
            return original(*args, **kwargs)
        finally:
            state.phase = state.x_live = state.x_detached = state.projected = None

    module._myopia_original_forward = original
    module.forward = forward


def _unwrap_forward(module: nn.Module) -> None:
    for m in [module, *module.children(), *_projections(module)]:
        original = getattr(m, "_myopia_original_forward", None)
        if original is not None:
            del m.forward  # the instance attribute; the class's forward shows through again
            m._myopia_original_forward = None
    if hasattr(module, "_myopia_state"):
        del module._myopia_state


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers causal LM (those with a ``layer_idx``)."""
    found = [
        m for m in model.modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
        and not getattr(m, "is_cross_attention", False)
    ]
    if not found:
        raise ValueError(
            f"make_myopic found no attention modules in {type(model).__name__}: expected modules named "
            "*Attention with a layer_idx (transformers' AttentionInterface-based families)"
        )
    return found


def make_myopic(
    model: nn.Module, cut: Cut | str = "myopic", beta: float | None = None, backend: str = "auto"
) -> nn.Module:
    """Switch a transformers causal LM to gradient cut ``cut`` in place and return it.

    ``cut``: a :class:`~myopia.attention.cut.Cut` or its text: ``myopic`` (the paper's; default) |
    ``myopic_kv`` | ``bigram`` | ``vanilla`` (restores the model's original attention implementation),
    with ``@BETA``, ``:h=W`` and ``:layers=A-B`` as in ``myopic:h=8:layers=0-3``. ``beta`` (optional)
    sets the cut's beta, as ``myopic@BETA`` does.
    """
    cut = Cut.parse(cut)
    if beta is not None:
        cut = cut.with_beta(beta)
    check_backend(backend)
    modules = attention_modules(model)
    cut.check_layers(len(modules), f"{type(model).__name__} with {len(modules)} attention layers")
    if cut.is_vanilla:
        original = getattr(model, "_myopia_original_attn", None)
        for m in modules:
            _unwrap_forward(m)
        if original is not None:
            _set_implementation(model, original)
            model._myopia_original_attn = None
        model._myopia_cut = None
        return model
    if getattr(model, "_myopia_original_attn", None) is None:
        model._myopia_original_attn = model.config._attn_implementation or "sdpa"
    _register()
    _set_implementation(model, ATTENTION_NAME)
    for position, m in enumerate(modules):
        layer_cut = cut.for_layer(_layer_index(m, position))
        if layer_cut.needs_past_kv:
            _wrap_forward(m)
        else:
            _unwrap_forward(m)
        m._myopia_state = _LayerState(cut=layer_cut, backend=backend)
    model._myopia_cut = cut
    return model


def _layer_index(module: nn.Module, position: int) -> int:
    index = getattr(module, "layer_idx", None)
    return position if index is None else int(index)


def _set_implementation(model: nn.Module, name: str) -> None:
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so make_myopic cannot switch it; use a supported family (GPT-2, GPT-NeoX, Llama, ...)"
        )
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def current_cut(model: nn.Module) -> Cut:
    """The cut ``make_myopic`` last set (vanilla if never)."""
    return getattr(model, "_myopia_cut", None) or VANILLA


__all__ = ["attention_modules", "current_cut", "make_myopic", "myopia_attention_forward"]
