"""Which backend computes one layer's attention: :func:`attention` routes a call to SDPA (vanilla),
the fused O(n)-memory op (:mod:`myopia.attention.fused`) or the eager n×n reference
(:mod:`myopia.attention.reference`), from the cut, the inputs and the kernels available
(:mod:`myopia.attention.kernels`).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

from myopia.attention import fused, kernels
from myopia.attention.cut import MYOPIC_MODES, VANILLA, Cut, check_backend
from myopia.attention.reference import expand_kv, reference_attention

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may attend) or an additive one, as an additive mask of ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )
    return mask.to(dtype)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention_dtype(device_type: str) -> torch.dtype | None:
    """The dtype attention computes in under autocast (None: autocast is off, inputs as given).
    On CUDA the autocast dtype, as ``F.scaled_dot_product_attention`` would cast to. On a CPU
    float32: PyTorch's CPU flash kernel runs its backward slower in bfloat16 than in float32
    (SmolLM2's 9 heads × 64 positions × 64 dims, 16 windows: 18.8 ms against 9.3 ms per layer,
    forward and backward, 2 AMD EPYC cores with AVX512-BF16), and float32 is the more accurate."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)


@contextlib.contextmanager
def attention_precision(*tensors):
    """``with attention_precision(q, k, v, ...) as (q, k, v, ...)``: the tensors in
    :func:`attention_dtype` with autocast off inside, so that every attention path (SDPA, the fused
    op, the reference; a model's rotary often hands over float32 queries and keys beside bfloat16
    values) computes in the same dtype; outside autocast, unchanged."""
    device = next(t for t in tensors if t is not None).device.type
    dtype = attention_dtype(device)
    if dtype is None:
        yield tensors
        return
    with torch.autocast(device, enabled=False):  # float64 is outside autocast's reach, and stays
        yield tuple(t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)
                    for t in tensors)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cut: Cut | str = VANILLA,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    k_past: torch.Tensor | None = None,
    v_past: torch.Tensor | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal self-attention with the gradient of one layer's ``cut``.

    Args:
        q, k, v: live queries, keys and values (after projection and rotary).
        cut: a :class:`Cut` or its text (``vanilla``, ``myopic``, ``myopic_kv:h=8``, ``myopic@0.5``, ...)
            without ``layers``. The forward value depends on its mode only (bigram differs).
        attn_mask: ``None`` for plain causal attention, else a boolean (True = may attend) or
            additive mask broadcastable to ``(B, H, T, T)`` that already contains causality.
        k_past, v_past: when ``cut.needs_past_kv`` (mode ``myopic``): the same keys/values computed
            from the *detached* attention input through the live projection weights. They carry the
            gradient of cut edges to the weights.
        backend: ``fused`` (O(n) memory; needs a kernel that returns the log-sum-exp),
            ``reference`` (the eager n×n recipe) or ``auto`` (fused where available).
        dropout_p: attention-probability dropout; the fused myopic path has none, so ``auto``
            falls back to the reference for myopic modes when it is non-zero.
    """
    cut = Cut.parse(cut)
    check_backend(backend)
    with attention_precision(q, k, v, k_past, v_past) as (q, k, v, k_past, v_past):
        return _attention(q, k, v, cut, scale, attn_mask, k_past, v_past, backend, dropout_p)


def _attention(q, k, v, cut: Cut, scale, attn_mask, k_past, v_past, backend: str, dropout_p: float) -> torch.Tensor:
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cut.changes_forward:
        return expand_kv(v, q.shape[1] // k.shape[1])
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(
            f"attention expects self-attention over one window: {q.shape[-2]} queries but "
            f"{k.shape[-2]} keys (decode with a KV cache through the model's own path)"
        )
    cut = cut.at_length(q.shape[-2])  # horizon 0 = the mode's cut; horizon >= T - 1 = vanilla
    if cut.needs_past_kv and (k_past is None or v_past is None):
        raise ValueError(
            f"attention cut {cut.spec!r} needs k_past and v_past (the keys/values of the detached "
            "attention input through the live projection weights); for constant past keys and "
            "values use myopic_kv"
        )
    mask = additive_mask(attn_mask, q.dtype)
    kernel, no_kernel_reason = kernels.select_kernel(q, k, v, mask)
    fused_ok = kernel is not None
    if backend == "fused" and not fused_ok:
        raise ValueError(f"attention backend 'fused' has no kernel for these inputs ({no_kernel_reason}); "
                         "use backend='auto' or 'reference'")
    if backend == "fused" and dropout_p > 0.0 and cut.cuts_gradient:
        raise ValueError("attention backend 'fused' does not support attention dropout; use 'reference'")
    if backend == "fused" and cut.mode in MYOPIC_MODES and cut.mode not in fused.MODES:
        raise ValueError(f"attention backend 'fused' does not implement cut {cut.spec!r}; use 'auto' or 'reference'")
    use_reference = backend == "reference"
    if cut.mode in MYOPIC_MODES and not use_reference:
        if not _needs_grad(q, k, v, k_past, v_past):
            cut = VANILLA  # identical forward value; no gradient to shape
        elif dropout_p > 0.0:
            _warn_once("dropout", "myopic attention with attention dropout runs the eager n×n reference")
            use_reference = True
        elif cut.mode not in fused.MODES:
            _warn_once(f"nofused-mode-{cut.mode}", f"the fused op does not implement cut mode {cut.mode!r}: it runs "
                       "on the eager n×n reference (memory grows as T²)")
            use_reference = True
        elif not fused_ok:
            _warn_once(
                f"nofused-{no_kernel_reason}",
                f"no fused attention kernel returning the log-sum-exp takes these inputs ({no_kernel_reason}): "
                "myopic attention falls back to the eager n×n reference (memory grows as T²)",
            )
            use_reference = True
    past = dict(k_past=k_past, v_past=v_past) if cut.needs_past_kv else dict(k_past=None, v_past=None)
    if use_reference:
        return reference_attention(q, k, v, cut=cut, scale=scale, mask=mask, dropout_p=dropout_p, **past)
    if cut.mode == "vanilla":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
    return fused.fused_myopic_attention(q, k, v, scale=scale, beta=cut.beta, horizon=cut.horizon, mask=mask, **past)


__all__ = ["additive_mask", "attention", "attention_dtype", "attention_precision"]
