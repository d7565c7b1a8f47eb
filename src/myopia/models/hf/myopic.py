"""Myopic training for Hugging Face causal LMs: ``make_myopic(model, mode)``.

Checked exact (forward equal, gradient = definition, float64; ``tests/test_families.py``) for GPT-2,
GPT-NeoX/Pythia, Llama, Mistral (sliding windows), Qwen2, Qwen3, Gemma-2 (logit soft-capping), GPT-OSS
(attention sinks), DeepSeek-V2/V3 and MiniCPM3 (two-stage latent projections); other families whose
attention goes through transformers' ``AttentionInterface`` run with a warning. An attention keyword
myopia does not apply, bidirectional attention, a position bias and training through a KV-cache
prefix are one-line errors. No HF forward code is copied: myopia registers an
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

from myopia.attention import VANILLA, Cut, additive_mask, attention, expand_kv
from myopia.attention.cut import check_backend
from myopia.attention.dispatch import attention_precision
from myopia.attention.projection import project_with_weight_only_copy
from myopia.attention.reference import reference_attention

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
    record_output: torch.Tensor | None = None  # the record pass's (all-zero) attention output


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
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    softcap, sinks = _score_terms(module, key, attention_mask, kwargs)
    if state.phase == "record":
        state.k_past, state.v_past = key, value
        B, H, T, D = query.shape
        state.record_output = query.new_zeros(B, T, H, value.shape[-1])
        return state.record_output, None
    q_len, k_len = query.shape[2], key.shape[2]
    if state.cut.changes_forward:
        out = expand_kv(value[:, :, k_len - q_len :], query.shape[1] // key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    k_past, v_past = state.k_past, state.v_past
    state.k_past = state.v_past = None
    if q_len != k_len and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ValueError(
            f"make_myopic({type(module).__name__}, {state.cut.spec!r}): training with a KV-cache prefix "
            "(past_key_values with gradients on) is not supported: the cached positions' hidden states are "
            "gone, so their keys/values cannot be cut as the definition asks; train on whole windows "
            "(use_cache=False) or run the cached forward under torch.no_grad()")
    plain = q_len != k_len or not torch.is_grad_enabled()  # decoding, or no gradient: the ordinary forward
    if softcap is not None or sinks is not None:
        cut = VANILLA if plain else state.cut
        if cut.needs_past_kv and k_past is None:
            raise RuntimeError(f"{type(module).__name__} was called with cut {cut.spec!r} without its detached pass")
        with attention_precision(query, key, value, k_past, v_past, sinks) as (query, key, value, k_past, v_past, sinks):
            out = _attention_with_score_terms(module, state, cut, query, key, value, attention_mask, dropout, scaling,
                                              softcap, sinks, k_past, v_past)
        return out.transpose(1, 2).contiguous(), None
    if plain:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
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


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """transformers' SDPA attention in myopia's attention precision (:func:`attention_precision`: float32
    on a CPU under autocast), so that a vanilla arm computes exactly what the myopic arms' op does."""
    with attention_precision(query, key, value) as (query, key, value):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


# Keywords transformers (5.x) passes to attention functions that do not change attention values:
# rotary is applied before the call (position_ids), packed sequences and sliding windows reach the
# "myopia" function through its (sdpa) mask, flash-attention's varlen metadata is what sdpa ignores
# too, and the rest are cache and output flags or the loss's token count.
_HARMLESS_KEYWORDS = frozenset({
    "position_ids", "use_cache", "cache_position", "output_attentions", "output_hidden_states",
    "output_router_logits", "num_items_in_batch", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
    "max_length_k", "seq_idx",
})
_UNDERSTOOD_KEYWORDS = _HARMLESS_KEYWORDS | {"sliding_window", "is_causal", "softcap", "s_aux", "position_bias"}


def _score_terms(
    module: nn.Module, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict
) -> tuple[float | None, torch.Tensor | None]:
    """``(softcap, sinks)`` from the attention keywords, after checking that every keyword is one
    myopia applies exactly; anything else is a one-line error, never silently dropped."""
    name = type(module).__name__
    unknown = sorted(set(kwargs) - _UNDERSTOOD_KEYWORDS)
    if unknown:
        raise ValueError(
            f"make_myopic: {name} passes attention keyword(s) {', '.join(unknown)} that myopia does not apply; "
            "ignoring them could change the forward pass, so myopia refuses. Use make_myopic(model, 'vanilla')")
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"make_myopic: {name} adds a position_bias (relative attention bias) to its scores, which "
                         "myopia does not support; use make_myopic(model, 'vanilla')")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        raise ValueError(f"make_myopic: {name} runs bidirectional attention (is_causal=False), which has no myopic "
                         "reading (the cut is between a position and its past); use make_myopic(model, 'vanilla')")
    window = kwargs.get("sliding_window")
    k_len = key.shape[-2]
    if window is not None and k_len > window and not _mask_holds_window(mask, window, k_len):
        raise ValueError(f"make_myopic: {name} asks for a sliding window of {window} that its attention mask does "
                         "not contain; myopia applies windows through the mask only. Use make_myopic(model, 'vanilla')")
    return kwargs.get("softcap"), kwargs.get("s_aux")


def _mask_holds_window(mask: torch.Tensor | None, window: int, k_len: int) -> bool:
    """Whether ``mask`` (bool or additive; queries are the last of ``k_len`` positions) excludes the
    key ``window`` positions back from every query: that diagonal bounds the band, so it is masked
    exactly when the window is in the mask."""
    if mask is None:
        return False
    mask = mask[..., :k_len]
    band = mask.diagonal(offset=k_len - mask.shape[-2] - window, dim1=-2, dim2=-1)
    if mask.dtype == torch.bool:
        return not bool(band.any())
    return bool((band <= torch.finfo(mask.dtype).min / 2).all())


_memory_warned: set[str] = set()


def _attention_with_score_terms(module, state, cut, query, key, value, mask, dropout, scaling, softcap, sinks,
                                k_past, v_past) -> torch.Tensor:
    """Attention with Gemma-2's logit soft-capping and/or GPT-OSS's sinks, through the eager
    reference (exact for every cut; memory grows as T²)."""
    name = type(module).__name__
    if state.backend == "fused":
        raise ValueError(f"make_myopic(backend='fused'): {name}'s attention has score terms (softcap/sinks) that "
                         "only the reference backend computes; use backend='auto' or 'reference'")
    if name not in _memory_warned:
        _memory_warned.add(name)
        import warnings

        warnings.warn(f"{name}: attention with logit soft-capping or sinks runs myopia's eager n×n reference in "
                      "every mode (exact; memory grows as T²)", RuntimeWarning, stacklevel=3)
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return reference_attention(
        query, key, value, cut=cut, scale=scale, mask=additive_mask(mask[..., :k_len], query.dtype),
        k_past=k_past if cut.needs_past_kv else None, v_past=v_past if cut.needs_past_kv else None,
        dropout_p=dropout, softcap=softcap, sinks=sinks,
    )


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
            if _is_record_output(x, state):
                out_features = _weight_and_bias(proj)[0].shape[0]
                return x.new_zeros(*x.shape[:-1], out_features)  # the output projection of zeros
            # Any other input, e.g. a second-stage projection (DeepSeek MLA's kv_b_proj, MiniCPM3) of
            # the first stage's output: run it, so the record pass computes the detached input's
            # keys/values through every live weight.
            return original(x, *args, **kwargs)
        if state.phase == "live" and x is state.x_live and id(proj) in state.projected:
            return state.projected.pop(id(proj))
        return original(x, *args, **kwargs)

    proj._myopia_original_forward = original
    proj.forward = forward


def _is_record_output(x: torch.Tensor, state: _LayerState) -> bool:
    """Whether ``x`` is (a view of) the record pass's zero attention output."""
    out = state.record_output
    return out is not None and x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()


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
            state.phase = state.x_live = state.x_detached = state.projected = state.record_output = None

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
    model: nn.Module, cut: Cut | str = "myopic", beta: float | None = None, backend: str = "auto",
    same_kernels: bool = False,
) -> nn.Module:
    """Switch a transformers causal LM to gradient cut ``cut`` in place and return it.

    ``cut``: a :class:`~myopia.attention.cut.Cut` or its text: ``myopic`` (the paper's; default) |
    ``myopic_kv`` | ``bigram`` | ``vanilla`` (restores the model's original attention implementation),
    with ``@BETA``, ``:h=W`` and ``:layers=A-B`` as in ``myopic:h=8:layers=0-3``. ``beta`` (optional)
    sets the cut's beta, as ``myopic@BETA`` does. ``same_kernels``: ``vanilla`` keeps myopia's attention
    function too (with nothing cut), so that a vanilla model computes its forward with exactly the
    kernels and precision its myopic twins use (on a CPU under bf16 autocast, myopia's attention is
    float32 and transformers' SDPA bfloat16); myopia's experiments build every arm this way.
    """
    cut = Cut.parse(cut)
    if beta is not None:
        cut = cut.with_beta(beta)
    check_backend(backend)
    modules = attention_modules(model)
    cut.check_layers(len(modules), f"{type(model).__name__} with {len(modules)} attention layers")
    if cut.is_vanilla and not same_kernels:
        original = getattr(model, "_myopia_original_attn", None)
        for m in modules:
            _unwrap_forward(m)
        if original is not None:
            _set_implementation(model, original)
            model._myopia_original_attn = None
        model._myopia_cut = None
        return model
    _warn_if_untested(model.config)
    if getattr(model, "_myopia_original_attn", None) is None:
        original = model.config._attn_implementation or "sdpa"
        _refuse_score_terms_the_model_ignores(model, modules, original)
        model._myopia_original_attn = original
    _register()
    _set_implementation(model, ATTENTION_NAME)
    for position, m in enumerate(modules):
        layer_cut = cut.for_layer(_layer_index(m, position))
        if layer_cut.needs_past_kv:
            _wrap_forward(m)
        else:
            _unwrap_forward(m)
        m._myopia_state = _LayerState(cut=layer_cut, backend=backend)
    model._myopia_cut = None if cut.is_vanilla else cut
    return model


def score_terms(modules: list[nn.Module]) -> list[str]:
    """The score terms the attention modules carry beyond q·k scaling and the mask: Gemma-2-style
    logit soft-capping (``attn_logit_softcapping``) and GPT-OSS-style sinks (a ``sinks`` parameter)."""
    found = []
    caps = {getattr(m, "attn_logit_softcapping", None) for m in modules} - {None}
    if caps:
        found.append(f"logit soft-capping (attn_logit_softcapping={', '.join(map(str, sorted(caps)))})")
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in modules):
        found.append("attention sinks")
    return found


def _refuse_score_terms_the_model_ignores(model: nn.Module, modules: list[nn.Module], implementation: str) -> None:
    """transformers' SDPA attention drops the softcap and s_aux keywords its families pass (its flash,
    flex and eager functions apply them); myopia applies them, so switching a model that runs SDPA
    would change its forward pass: refuse, naming the fix."""
    terms = score_terms(modules)
    if terms and "sdpa" in implementation:
        raise ValueError(
            f"make_myopic: {type(model).__name__} runs attn_implementation={implementation!r}, which ignores its "
            f"{' and '.join(terms)} while myopia applies it, so the forward would change; load the model with "
            "attn_implementation='eager' (or call model.set_attn_implementation('eager')) first")


def _layer_index(module: nn.Module, position: int) -> int:
    index = getattr(module, "layer_idx", None)
    return position if index is None else int(index)


TESTED_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt_oss", "deepseek_v2",
                   "deepseek_v3", "minicpm3")  # config.model_type of every family tests/test_families.py checks
_untested_warned: set[str] = set()


def _warn_if_untested(config) -> None:
    family = getattr(config, "model_type", "?")
    if family not in TESTED_FAMILIES and family not in _untested_warned:
        _untested_warned.add(family)
        import warnings

        warnings.warn(f"make_myopic: model family {family!r} is not among those tested exact against the definition "
                      f"({', '.join(TESTED_FAMILIES)}); check a tiny config of it as tests/test_families.py does",
                      RuntimeWarning, stacklevel=3)


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
