"""Access to PyTorch's fused attention kernels that also return the row log-sum-exp.

``F.scaled_dot_product_attention`` never returns the log-sum-exp (lse) that the myopic backward needs,
so this module calls the private ATen ops behind it. Their names and signatures are private API:
everything here is gated on what the running torch offers, and :func:`select_kernel` answers
``None`` with the reason (so callers fall back to the eager reference) when no suitable kernel exists.

All tensors are laid out as SDPA's: ``(batch, heads, time, head_dim)``; keys and values have as many
heads as the queries (grouped-query expansion happens before). ``mask`` is ``None`` (causal) or an
additive float mask of the query dtype, broadcastable to ``(B, H, T, T)``, that already contains
causality.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_aten = torch.ops.aten

# What the fused kernels accept (PyTorch's own preconditions for SDPA's flash and memory-efficient
# backends, torch/csrc sdp_utils): checked before every private call, so an input no kernel takes goes
# to the eager reference with a warning instead of failing inside the kernel.
FLASH_MIN_CAPABILITY = (8, 0)
EFFICIENT_MIN_CAPABILITY = (5, 0)
EFFICIENT_BF16_MIN_CAPABILITY = (8, 0)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
EFFICIENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_ALIGNMENT = 8  # the memory-efficient kernel reads its bias with rows aligned to 8 elements


def _has(name: str) -> bool:
    return hasattr(_aten, name)


def choose_kernel(
    device_type: str,
    dtype: torch.dtype,
    qk_dim: int,
    v_dim: int,
    has_mask: bool,
    capability: tuple[int, int] | None = None,
) -> tuple[str | None, str]:
    """``(kind, reason)``: the fused kernel :func:`fused_forward` runs for these inputs (``cpu`` |
    ``flash`` | ``efficient``), or ``None`` and why none applies. ``capability`` is the CUDA compute
    capability; a plain function of its arguments, so the routing is tested without a GPU."""
    if device_type == "cpu":
        if not (_has("_scaled_dot_product_flash_attention_for_cpu")
                and _has("_scaled_dot_product_flash_attention_for_cpu_backward")):
            return None, "this torch has no CPU flash-attention op"
        if dtype not in CPU_DTYPES:
            return None, f"the CPU kernel does not take {dtype}"
        return "cpu", ""
    if device_type != "cuda":
        return None, f"no fused kernel for device {device_type!r}"
    capability = tuple(capability or (0, 0))
    if (capability >= FLASH_MIN_CAPABILITY and dtype in FLASH_DTYPES and not has_mask and qk_dim == v_dim
            and qk_dim % 8 == 0 and qk_dim <= 256 and _has("_scaled_dot_product_flash_attention")):
        return "flash", ""
    align = 4 if dtype == torch.float32 else 8
    if dtype not in EFFICIENT_DTYPES:
        return None, f"no fused CUDA kernel takes {dtype} (flash: float16/bfloat16; memory-efficient: also float32)"
    if capability < EFFICIENT_MIN_CAPABILITY:
        return None, f"compute capability {capability} is below the memory-efficient kernel's {EFFICIENT_MIN_CAPABILITY}"
    if dtype == torch.bfloat16 and capability < EFFICIENT_BF16_MIN_CAPABILITY:
        return None, f"bfloat16 needs compute capability {EFFICIENT_BF16_MIN_CAPABILITY} (this GPU: {capability})"
    if qk_dim % align or v_dim % align:
        return None, f"head sizes {qk_dim}/{v_dim} are not multiples of {align} (the memory-efficient kernel's alignment)"
    if not _has("_scaled_dot_product_efficient_attention"):
        return None, "this torch has no memory-efficient attention op"
    return "efficient", ""


_capabilities: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = tuple(torch.cuda.get_device_capability(index))
    return _capabilities[index]


def select_kernel(
    q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[str | None, str]:
    """:func:`choose_kernel` for these tensors (keys/values default to the queries' head size)."""
    if q.dim() != 4:
        return None, "inputs are not (batch, heads, time, head_dim)"
    qk_dim = q.shape[-1] if k is None else k.shape[-1]
    v_dim = qk_dim if v is None else v.shape[-1]
    return choose_kernel(q.device.type, q.dtype, qk_dim, v_dim, mask is not None, _capability(q.device))


def kernel_kind(q: torch.Tensor, mask: torch.Tensor | None, v_dim: int | None = None) -> str:
    """Which fused kernel :func:`fused_forward` uses: ``cpu`` | ``flash`` | ``efficient``."""
    kind, reason = choose_kernel(q.device.type, q.dtype, q.shape[-1], q.shape[-1] if v_dim is None else v_dim,
                                 mask is not None, _capability(q.device))
    if kind is None:
        raise ValueError(f"no fused attention kernel for these inputs: {reason}")
    return kind


def prepare_efficient_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The additive mask as ``F.scaled_dot_product_attention`` hands it to the memory-efficient
    kernel: rows padded to a multiple of 8 elements and sliced back (unless every stride but the
    last is already a multiple of 8 and the last is 1), then expanded to ``(B, H, Tq, Tk)``."""
    aligned = mask.stride(-1) == 1 and all(s % MASK_ALIGNMENT == 0 for s in mask.stride()[:-1])
    if not aligned:
        n = mask.shape[-1]
        mask = F.pad(mask, (0, MASK_ALIGNMENT - n % MASK_ALIGNMENT))[..., :n]
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _pad_head(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


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
    kind = kernel_kind(q, mask, v.shape[-1])
    if kind == "cpu":
        # The CPU kernel wants equal query/key and value head sizes: zero columns change no score
        # (the scale is explicit) and no output column that is kept.
        width, v_dim = max(q.shape[-1], v.shape[-1]), v.shape[-1]
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            _pad_head(q, width), _pad_head(k, width), _pad_head(v, width), 0.0, is_causal=causal, attn_mask=mask,
            scale=scale,
        )
        return out[..., :v_dim], lse, ("cpu",)
    if kind == "flash":
        res = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused = res[:8]
        return out, lse, ("flash", cum_q, cum_k, max_q, max_k, rng_state, unused)
    bias = None if mask is None else prepare_efficient_mask(mask, q, k)
    out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, causal, scale=scale
    )
    # The efficient kernel may pad the lse along the query dimension: keep the padded one for its
    # backward and hand out the (B, H, T) part.
    return out, lse[..., :T], ("efficient", seed, offset, lse)


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
    lse_store: torch.Tensor, aux0: torch.Tensor, aux1: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None,
    v_dim: int | None = None,
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    kind = kernel_kind(q, mask, v_dim)
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

    If the private backward op is unavailable (:func:`kernel_unavailable`: its signature moves between
    torch releases, or no kernel is registered for the inputs), the gradients are recomputed through
    an eager attention instead, with a one-time warning: slower, O(n²) memory, same values. Any other
    error (out of memory, a failing kernel) propagates.
    """
    try:
        return _fused_backward(dout, q, k, v, out, lse, extras, scale=scale, mask=mask)
    except Exception as exc:
        if not kernel_unavailable(exc):
            raise
        import warnings

        warnings.warn(f"fused attention backward unavailable ({str(exc).splitlines()[0][:120]}); "
                      "recomputing it eagerly (memory grows as T²)", RuntimeWarning, stacklevel=2)
        return _eager_backward(dout, q, k, v, scale=scale, mask=mask)


# How PyTorch says that an op or an argument list does not exist (as opposed to a kernel that ran
# and failed): the dispatcher's and the argument parser's own wording.
_UNAVAILABLE_MESSAGES = (
    "Could not run",
    "Unknown keyword argument",
    "is missing value for argument",
    "Expected a value of type",
    "positional argument",
    "unexpected keyword argument",
    "No available kernel",
)


def kernel_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "this private kernel or signature does not exist here" (then an eager
    recomputation gives the same values), not out of memory or a real kernel error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, (NotImplementedError, AttributeError)):
        return True
    if isinstance(exc, (RuntimeError, TypeError)):
        message = str(exc)
        return any(m in message for m in _UNAVAILABLE_MESSAGES)
    return False


def _eager_backward(dout, q, k, v, *, scale, mask):
    """Vanilla attention's ``(dq, dk, dv)`` in closed form (no autograd: this runs inside a custom
    op's backward, below the autograd dispatch key): with ``P = softmax(c·q kᵀ + mask)``,
    ``dv = Pᵀ do``, ``dS = P ∘ (do vᵀ − rowsum(do ∘ o))``, ``dq = c·dS k``, ``dk = c·dSᵀ q``."""
    from myopia.attention.reference import _softmax, causal_additive_mask

    if mask is None:
        mask = causal_additive_mask(q.shape[-2], q.dtype, q.device)
    p = _softmax(q @ k.transpose(-1, -2) * scale + mask)
    out = p @ v
    ds = p * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ dout


def _fused_backward(dout, q, k, v, out, lse, extras, *, scale, mask):
    causal = mask is None
    kind = extras[0]
    dout = dout.contiguous()
    if kind == "cpu":
        qk_dim, v_dim = q.shape[-1], v.shape[-1]
        width = max(qk_dim, v_dim)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _pad_head(dout, width), _pad_head(q, width), _pad_head(k, width), _pad_head(v, width),
            _pad_head(out, width), lse, 0.0, causal, attn_mask=mask, scale=scale
        )
        return dq[..., :qk_dim], dk[..., :qk_dim], dv[..., :v_dim]
    if kind == "flash":
        _, cum_q, cum_k, max_q, max_k, rng_state, unused = extras
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused,
            scale=scale,
        )
        return dq, dk, dv
    _, seed, offset, lse_padded = extras
    bias = None if mask is None else prepare_efficient_mask(mask, q, k)
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, bias, out, lse_padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale,
    )
    return dq, dk, dv
