"""Access to PyTorch's fused attention kernels that also return the row log-sum-exp.

``F.scaled_dot_product_attention`` never returns the log-sum-exp (lse) that the myopic backward needs,
so this module calls the private ATen ops behind it. Their names and signatures are private API:
everything here is gated on what the running torch offers, and :func:`fused_available` answers
``False`` (so callers fall back to the eager reference) when no suitable kernel exists.

All tensors are laid out as SDPA's: ``(batch, heads, time, head_dim)``; keys and values have as many
heads as the queries (grouped-query expansion happens before). ``mask`` is ``None`` (causal) or an
additive float mask of the query dtype, broadcastable to ``(B, H, T, T)``, that already contains
causality.
"""

from __future__ import annotations

from typing import Any

import torch

_aten = torch.ops.aten


def _has(name: str) -> bool:
    return hasattr(_aten, name)


def fused_available(q: torch.Tensor) -> bool:
    """Whether a fused, lse-returning kernel exists for this device."""
    if q.dim() != 4:
        return False
    if q.device.type == "cpu":
        return _has("_scaled_dot_product_flash_attention_for_cpu") and _has(
            "_scaled_dot_product_flash_attention_for_cpu_backward"
        )
    if q.device.type == "cuda":
        return _has("_scaled_dot_product_efficient_attention")
    return False


def _use_cuda_flash(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return (
        mask is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and _has("_scaled_dot_product_flash_attention")
    )


def fused_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """Return ``(out, lse, extras)``; ``lse`` is float32 (or float64) of shape ``(B, H, T)``."""
    causal = mask is None
    T = q.shape[-2]
    kind = kernel_kind(q, mask)
    if kind == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal=causal, attn_mask=mask, scale=scale
        )
        return out, lse, ("cpu",)
    if kind == "flash":
        res = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused = res[:8]
        return out, lse, ("flash", cum_q, cum_k, max_q, max_k, rng_state, unused)
    out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(
        q, k, v, mask, True, 0.0, causal, scale=scale
    )
    # The efficient kernel may pad the lse along the query dimension: keep the padded one for its
    # backward and hand out the (B, H, T) part.
    return out, lse[..., :T], ("efficient", seed, offset, lse)


def kernel_kind(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    """Which fused kernel :func:`fused_forward` uses: ``cpu`` | ``flash`` | ``efficient``."""
    if q.device.type == "cpu":
        return "cpu"
    return "flash" if _use_cuda_flash(q, mask) else "efficient"


def pack_extras(
    extras: tuple[Any, ...], lse: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's by-products as three tensors ``(lse_store, aux0, aux1)`` (a custom op returns
    tensors only); :func:`unpack_extras` inverts it."""
    kind = extras[0]
    none = lambda t: q.new_empty(0) if t is None else t
    if kind == "flash":
        return lse, none(extras[5]), none(extras[6])
    if kind == "efficient":
        return extras[3], none(extras[1]), none(extras[2])
    return lse, q.new_empty(0), q.new_empty(0)


def unpack_extras(
    lse_store: torch.Tensor, aux0: torch.Tensor, aux1: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    kind = kernel_kind(q, mask)
    T = q.shape[-2]
    if kind == "flash":
        return lse_store, ("flash", None, None, T, T, aux0, aux1)
    if kind == "efficient":
        return lse_store[..., :T], ("efficient", aux0, aux1, lse_store)
    return lse_store, ("cpu",)


def fused_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    extras: tuple[Any, ...],
    *,
    scale: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The fused backward: ``(dq, dk, dv)`` of ordinary (vanilla) causal attention.

    If the private backward op refuses (its signature moves between torch releases), the gradients
    are recomputed through an eager attention instead, with a one-time warning: slower, O(n²)
    memory, same values.
    """
    try:
        return _fused_backward(dout, q, k, v, out, lse, extras, scale=scale, mask=mask)
    except (RuntimeError, TypeError) as exc:
        if q.device.type == "cpu":
            raise
        import warnings

        warnings.warn(f"fused attention backward unavailable ({str(exc).splitlines()[0][:120]}); "
                      "recomputing it eagerly", RuntimeWarning, stacklevel=2)
        return _eager_backward(dout, q, k, v, scale=scale, mask=mask)


def _eager_backward(dout, q, k, v, *, scale, mask):
    from myopia.attention.reference import reference_attention

    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = reference_attention(qq, kk, vv, cut="vanilla", scale=scale, mask=mask)
        return torch.autograd.grad(out, (qq, kk, vv), dout)


def _fused_backward(dout, q, k, v, out, lse, extras, *, scale, mask):
    causal = mask is None
    kind = extras[0]
    dout = dout.contiguous()
    if kind == "cpu":
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
        return dq, dk, dv
    if kind == "flash":
        _, cum_q, cum_k, max_q, max_k, rng_state, unused = extras
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused,
            scale=scale,
        )
        return dq, dk, dv
    _, seed, offset, lse_padded = extras
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, mask, out, lse_padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale,
    )
    return dq, dk, dv
