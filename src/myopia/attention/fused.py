"""O(n)-memory myopic attention: a fused forward plus a backward that keeps keys' and values'
own-position terms only.

Forward: one fused causal-attention kernel that also returns the row log-sum-exp ``lse``; no n×n
tensor exists at any point. Backward, per head, with ``p_ii = exp(c·q_i·k_i + m_ii − lse_i)`` and
``D_i = do_i·o_i``:

- ``dq`` comes from the fused backward unchanged (queries are live at their own position);
- the own-position key/value terms are ``dk_i = c·p_ii·(do_i·v_i − D_i)·q_i`` and ``dv_i = p_ii·do_i``
  (O(n·d));
- the cross-position rest ``dk_full − dk_own`` is scaled by ``beta`` into the live keys and, when the
  caller passes ``k_past`` (the ``myopic`` mode: the keys of the *detached* input through live
  weights), by ``1 − beta`` into ``k_past``, so that the projection weights still learn from every
  position while the input learns only from its own.

With a horizon w > 0 the "own" terms become the band's: every edge ``0 ≤ i − j ≤ w`` keeps its full
gradient. :func:`band_kv_grads` recomputes the band's key/value gradient chunk by chunk from the
forward's log-sum-exp (probabilities ``exp(s − lse)`` near the band only): extra time
O(n·(w + 128)·d), temporary memory O(128·(w + 128)) per head, no n×n tensor.

Because the forward values of ``k_past`` and ``k`` are equal, the caller may pass the same tensor
values twice; only the gradient routing differs.

The op is registered with ``torch.library`` (``myopia::myopic_attention`` and its backward
``myopia::myopic_attention_backward``), each with a fake implementation, so ``torch.compile``
traces through it. On CUDA the O(n·d) part runs as one Triton kernel
(:mod:`myopia.attention.triton_diag`); elsewhere, and with a custom mask, as PyTorch element-wise ops.
On a CPU, attention over at most :data:`CPU_GROUPED_BACKWARD_MAX_T` positions takes its whole backward from
:func:`grouped_backward` instead: matrix products over the probabilities recomputed from the lse,
grouped-query heads stacked per key/value head (no expanded copies), the own-position (or band) terms
read from them. At SmolLM2's 64-token windows this is faster than the private CPU flash backward plus the split;
from 128 positions on the flash kernel is faster, and memory grows as T².
"""

from __future__ import annotations

import torch

from myopia.attention import kernels, triton_diag
from myopia.attention.reference import causal_additive_mask, expand_kv

MODES: tuple[str, ...] = ("myopic", "myopic_kv")
"""The cut modes this op computes; :func:`myopia.attention.attention` runs any other gradient cut on
the eager reference."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduce_groups(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    if t is None or groups == 1:
        return t
    B, H, T, D = t.shape
    return t.view(B, H // groups, groups, T, D).sum(2)


def own_position_kv_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    mask_diag: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys' and values' own-position gradient terms, O(n·d) (all heads expanded)."""
    compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    qf, kf, vf, of, dof = (t.to(compute) for t in (q, k, v, out, dout))
    score = (qf * kf).sum(-1) * scale
    if mask_diag is not None:
        score = score + mask_diag.to(compute)
    lse = lse.to(compute)
    # A fully masked row has lse = -inf: it attends to nothing and gets no gradient.
    p_own = torch.where(torch.isfinite(lse), torch.exp(score - lse), torch.zeros_like(lse))
    delta = (dof * of).sum(-1)
    dv = p_own.unsqueeze(-1) * dof
    dk = (scale * p_own * ((dof * vf).sum(-1) - delta)).unsqueeze(-1) * qf
    return dk.to(k.dtype), dv.to(v.dtype)


def _mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """A mask broadcastable to ``(B, H, T, T)`` with its missing leading dimensions added as 1."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


_BAND_KEYS = 128  # keys per chunk in band_kv_grads


def band_kv_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    horizon: int,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys' and values' gradient from the edges ``0 ≤ i − j ≤ horizon`` (all heads expanded).

    Keys go in chunks of ``C`` = 128; chunk ``[j0, j0 + C)`` meets only the queries
    ``[j0, j0 + C + horizon)``, whose probabilities ``exp(c·q·k − lse)`` are recomputed from the
    forward's log-sum-exp. Time O(n·(C + w)·d), temporary memory O(C·(C + w)) per head.
    """
    compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    T = q.shape[-2]
    qf, kf, vf, dof = (t.to(compute) for t in (q, k, v, dout))
    lse = lse.to(compute)
    delta = (dof * out.to(compute)).sum(-1)
    m4 = None if mask is None else _mask_4d(mask).expand(-1, -1, T, T)  # a query dimension of 1 still slices per chunk
    dk = torch.empty(k.shape, dtype=compute, device=k.device)
    dv = torch.empty(v.shape, dtype=compute, device=v.device)
    for j0 in range(0, T, _BAND_KEYS):
        j1 = min(T, j0 + _BAND_KEYS)
        i1 = min(T, j1 + horizon)
        q_c, do_c = qf[:, :, j0:i1], dof[:, :, j0:i1]
        lse_c, delta_c = lse[:, :, None, j0:i1], delta[:, :, None, j0:i1]
        offset = torch.arange(j0, i1, device=q.device).view(1, -1) - torch.arange(j0, j1, device=q.device).view(-1, 1)
        scores = kf[:, :, j0:j1] @ q_c.transpose(-1, -2) * scale  # (B, H, keys, queries)
        if m4 is not None:
            scores = scores + m4[:, :, j0:i1, j0:j1].transpose(-1, -2).to(compute)
        keep = (offset >= 0) & (offset <= horizon) & torch.isfinite(lse_c)  # a fully masked row reads nothing
        p = torch.where(keep, torch.exp(scores - torch.where(torch.isfinite(lse_c), lse_c, 0.0)), 0.0)
        ds = p * (vf[:, :, j0:j1] @ do_c.transpose(-1, -2) - delta_c)
        dv[:, :, j0:j1] = p @ do_c
        dk[:, :, j0:j1] = (ds @ q_c) * scale
    return dk.to(k.dtype), dv.to(v.dtype)


CPU_GROUPED_BACKWARD_MAX_T = 64
"""On a CPU, attention over windows of at most this many positions takes its backward as grouped
matrix products over the recomputed probabilities (:func:`grouped_backward`) instead of PyTorch's
private CPU flash backward over expanded keys/values followed by the separate own-position split.
Measured on 2 AMD EPYC cores (9 query heads, 3 key/value heads, head size 64, float32, the myopic
mode's forward and backward; BENCHMARKS.md): 5.0 against 5.9 ms at 8 × 64 tokens, but 18.4 against
15.3 ms at 8 × 128 and 1.7-3.1× slower from 256 on, where the flash kernel's blocking wins. One SmolLM2
attention layer at 8 × 64: 16.2 ms instead of 18.1-20.4."""

_GROUPED_MAX_SCORES = 1 << 22  # and at most this many scores (16 MB per float32 temporary)

_EMPTY = 0  # length of the placeholder tensors a custom op returns for "no tensor"


def _grouped_mask(mask: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """An additive mask broadcastable to ``(B, H, T, T)`` laid out for ``(B, kv heads, groups, T, T)``."""
    m = _mask_4d(mask)
    if m.shape[1] == 1:
        return m.unsqueeze(2)
    return m.reshape(m.shape[0], kv_heads, groups, *m.shape[2:])


def grouped_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    horizon: int,
    need_full: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dq, dk_full, dv_full, dk_band, dv_band)`` of causal attention from its output and log-sum-exp,
    as matrix products over the recomputed probabilities ``P = exp(c·q·kᵀ + mask − lse)``: ``dq`` and
    the keys'/values' full gradient (``None`` unless ``need_full``), and the keys'/values' terms from
    the edges ``0 ≤ i − j ≤ horizon`` (horizon 0: the own position, read from P's diagonal).

    Grouped-query attention stays grouped: each key/value head's query heads are stacked along the
    rows (``(B, kv heads, groups · T, ·)``), so the key/value gradients come summed over their group
    with no expanded copy. Computed in float32 for low-precision inputs (float64 for float64) and
    returned in the inputs' dtypes. Memory O(B · H · T²): for short windows (:data:`CPU_GROUPED_BACKWARD_MAX_T`)."""
    compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    B, Hq, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    qf = q.to(compute).reshape(B, Hkv, G * T, D)
    kf, vf = k.to(compute), v.to(compute)
    of = out.to(compute).reshape(B, Hkv, G * T, Dv)
    dof = dout.to(compute).reshape(B, Hkv, G * T, Dv)
    s = (qf @ kf.transpose(-1, -2)).mul_(scale).reshape(B, Hkv, G, T, T)
    if mask is None:
        s = s + causal_additive_mask(T, compute, q.device)
    else:
        s = s + _grouped_mask(mask.to(compute), Hkv, G)
    l = lse.to(compute).reshape(B, Hkv, G, T, 1)
    # a fully masked row (lse = -inf) attends to nothing: its probabilities are 0, not nan
    p = torch.exp(s.sub_(torch.where(torch.isfinite(l), l, 0.0)))
    pf = p.reshape(B, Hkv, G * T, T)
    ds = pf * (dof @ vf.transpose(-1, -2) - (dof * of).sum(-1, keepdim=True))
    dq = (ds @ kf).mul_(scale).reshape(B, Hq, T, D)
    dk_full = dv_full = None
    if need_full:
        dk_full = (ds.transpose(-1, -2) @ qf).mul_(scale)
        dv_full = pf.transpose(-1, -2) @ dof
    if horizon == 0:
        p_own = p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, Hkv, G, T, 1)
        ds_own = ds.reshape(B, Hkv, G, T, T).diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        dv_band = (p_own * dof.reshape(B, Hkv, G, T, Dv)).sum(2)
        dk_band = (ds_own * qf.reshape(B, Hkv, G, T, D)).sum(2).mul_(scale)
    else:
        i = torch.arange(T, device=q.device)
        offset = i.reshape(-1, 1) - i.reshape(1, -1)  # query i, key j
        band = ((offset >= 0) & (offset <= horizon)).to(compute)
        dv_band = (p * band).reshape(B, Hkv, G * T, T).transpose(-1, -2) @ dof
        dk_band = ((ds.reshape(B, Hkv, G, T, T) * band).reshape(B, Hkv, G * T, T).transpose(-1, -2) @ qf).mul_(scale)
    cast = lambda t, like: None if t is None else t.to(like.dtype)
    return (dq.to(q.dtype), cast(dk_full, k), cast(dv_full, v), dk_band.to(k.dtype), dv_band.to(v.dtype))


def _use_grouped_backward(q: torch.Tensor, mask: torch.Tensor | None, v_dim: int) -> bool:
    """Whether :func:`grouped_backward` takes this backward: a CPU op (its forward ran the CPU kernel,
    so the stored lse is the plain one) over a short window (:data:`CPU_GROUPED_BACKWARD_MAX_T`)."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and T <= CPU_GROUPED_BACKWARD_MAX_T and B * H * T * T <= _GROUPED_MAX_SCORES
            and kernels.kernel_kind(q, mask, v_dim) == "cpu")


def _kv_mask_diag(mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.expand(*mask.shape[:-2], T, T).diagonal(dim1=-2, dim2=-1)


def _fused_backward(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale):
    """``(lse, dq, dk_full, dv_full)``: the fused (vanilla) backward over expanded keys/values."""
    groups = q.shape[1] // k.shape[1]
    lse, extras = kernels.unpack_extras(lse_store, aux0, aux1, q, mask, v.shape[-1])
    dq, dk_full, dv_full = kernels.fused_backward(
        dout, q, expand_kv(k, groups), expand_kv(v, groups), out, lse, extras, scale=scale, mask=mask
    )
    return lse, dq, dk_full, dv_full


def _forward_impl(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    out, lse, extras = kernels.fused_forward(q, expand_kv(k, groups), expand_kv(v, groups), scale=scale, mask=mask)
    return (out, *kernels.pack_extras(extras, lse, q))


@torch.library.custom_op("myopia::myopic_attention", mutates_args=())
def _myopic_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_past: torch.Tensor | None,
    v_past: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    beta: float,
    horizon: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused causal attention: ``(out, lse_store, aux0, aux1)``. ``k_past``/``v_past`` (forward
    values equal to ``k``/``v``), ``beta`` and ``horizon`` (0 = the diagonal only) matter to the
    backward only."""
    return _forward_impl(q, k, v, mask, scale)


@_myopic_attention_op.register_fake
def _(q, k, v, k_past, v_past, mask, scale, beta, horizon):
    return _forward_impl(q, k, v, mask, scale)


@torch.library.custom_op("myopia::myopic_attention_backward", mutates_args=())
def _myopic_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse_store: torch.Tensor,
    aux0: torch.Tensor,
    aux1: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    beta: float,
    horizon: int,
    want_past_k: bool,
    want_past_v: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk_live, dv_live, dk_past, dv_past)``; an unwanted past gradient is an empty tensor.
    Key/value gradients are contiguous, in the key/value heads' shape."""
    need_cross = beta > 0.0 or want_past_k or want_past_v
    if _use_grouped_backward(q, mask, v.shape[-1]):
        lse, _ = kernels.unpack_extras(lse_store, aux0, aux1, q, mask, v.shape[-1])
        dq, dk_full, dv_full, dk_own, dv_own = grouped_backward(
            dout, q, k, v, out, lse, mask, scale, horizon, need_full=need_cross)
        dk_live, dv_live, dk_past, dv_past = _compose_kv_grads(
            dk_own, dv_own, dk_full, dv_full, beta=beta, need_cross=need_cross, want_past_k=want_past_k,
            want_past_v=want_past_v)
        return _backward_outputs(q, dq, dk_live, dv_live, dk_past, dv_past)
    lse, dq, dk_full, dv_full = _fused_backward(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale)
    if horizon == 0 and mask is None and triton_diag.available(q, v):
        dk_live, dv_live, dk_past, dv_past = triton_diag.split_kv_grads(
            q, k, v, out, dout, lse, dk_full if need_cross else None, dv_full if need_cross else None,
            scale=scale, beta=beta, want_past_k=want_past_k, want_past_v=want_past_v,
        )
    else:
        groups = q.shape[1] // k.shape[1]
        dk_live, dv_live, dk_past, dv_past = _split_kv_grads_torch(
            q, expand_kv(k, groups), expand_kv(v, groups), out, dout, lse, dk_full, dv_full, scale=scale, beta=beta,
            mask=mask, horizon=horizon, groups=groups, need_cross=need_cross,
            want_past_k=want_past_k, want_past_v=want_past_v,
        )
    return _backward_outputs(q, dq, dk_live, dv_live, dk_past, dv_past)


def _backward_outputs(q, dq, dk_live, dv_live, dk_past, dv_past):
    return (
        dq,
        dk_live.contiguous(),
        dv_live.contiguous(),
        q.new_empty(_EMPTY) if dk_past is None else dk_past.contiguous(),
        q.new_empty(_EMPTY) if dv_past is None else dv_past.contiguous(),
    )


@_myopic_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale, beta, horizon, want_past_k, want_past_v):
    if _use_grouped_backward(q, mask, v.shape[-1]):
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # grouped_backward's dq is contiguous
    else:
        _, dq, _, _ = _fused_backward(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale)
    kv = lambda want, t: torch.empty(t.shape, dtype=t.dtype, device=t.device) if want else q.new_empty(_EMPTY)
    return dq, kv(True, k), kv(True, v), kv(want_past_k, k), kv(want_past_v, v)


def _split_kv_grads_torch(q, k_e, v_e, out, dout, lse, dk_full, dv_full, *, scale, beta, mask, horizon, groups,
                          need_cross, want_past_k, want_past_v):
    if horizon > 0:
        dk_own, dv_own = band_kv_grads(q, k_e, v_e, out, dout, lse, scale, horizon, mask)
    else:
        dk_own, dv_own = own_position_kv_grads(q, k_e, v_e, out, dout, lse, scale, _kv_mask_diag(mask, q.shape[-2]))
    dk_own, dv_own = _reduce_groups(dk_own, groups), _reduce_groups(dv_own, groups)
    if need_cross:
        dk_full, dv_full = _reduce_groups(dk_full, groups), _reduce_groups(dv_full, groups)
    return _compose_kv_grads(dk_own, dv_own, dk_full, dv_full, beta=beta, need_cross=need_cross,
                             want_past_k=want_past_k, want_past_v=want_past_v)


def _compose_kv_grads(dk_own, dv_own, dk_full, dv_full, *, beta, need_cross, want_past_k, want_past_v):
    """The live and past key/value gradients from the own (or band) terms and the full ones (in the
    key/value heads' shape): the cross-position rest goes ``beta`` to the live keys/values and
    ``1 − beta`` to the past."""
    dk_live, dv_live, dk_past, dv_past = dk_own, dv_own, None, None
    if need_cross:
        dk_cross = dk_full - dk_own
        dv_cross = dv_full - dv_own
        if beta > 0.0:
            dk_live = dk_own + beta * dk_cross
            dv_live = dv_own + beta * dv_cross
        if want_past_k:
            dk_past = dk_cross if beta == 0.0 else (1.0 - beta) * dk_cross
        if want_past_v:
            dv_past = dv_cross if beta == 0.0 else (1.0 - beta) * dv_cross
    return dk_live, dv_live, dk_past, dv_past


def _setup_context(ctx, inputs, output):
    q, k, v, k_past, v_past, mask, scale, beta, horizon = inputs
    out, lse_store, aux0, aux1 = output
    ctx.save_for_backward(q, k, v, out, lse_store, aux0, aux1, mask)
    ctx.scale, ctx.beta, ctx.horizon = scale, float(beta), int(horizon)
    ctx.want_past = (k_past is not None, v_past is not None)


def _backward(ctx, dout, _dlse, _daux0, _daux1):
    q, k, v, out, lse_store, aux0, aux1, mask = ctx.saved_tensors
    dq, dk, dv, dk_past, dv_past = _myopic_attention_backward_op(
        dout, q, k, v, out, lse_store, aux0, aux1, mask, ctx.scale, ctx.beta, ctx.horizon, *ctx.want_past
    )
    return (
        dq, dk, dv,
        dk_past if ctx.want_past[0] else None,
        dv_past if ctx.want_past[1] else None,
        None, None, None, None,
    )


_myopic_attention_op.register_autograd(_backward, setup_context=_setup_context)


def fused_myopic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    beta: float = 0.0,
    horizon: int | None = None,
    mask: torch.Tensor | None = None,
    k_past: torch.Tensor | None = None,
    v_past: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention (values as SDPA's) whose backward is the myopic one (module docstring);
    ``horizon`` w > 0 keeps the full gradient of edges ``0 ≤ i − j ≤ w``.

    A ``torch.library`` custom op (``torch.ops.myopia.myopic_attention``) with a fake
    implementation and a registered backward, so ``torch.compile`` traces models through it
    without graph breaks."""
    return _myopic_attention_op(q, k, v, k_past, v_past, mask, float(scale), float(beta), int(horizon or 0))[0]


def fused_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: ``(out, lse)`` from the fused kernel (used by tests and diagnostics)."""
    groups = q.shape[1] // k.shape[1]
    out, lse, _ = kernels.fused_forward(
        q, expand_kv(k, groups), expand_kv(v, groups), scale=scale, mask=mask
    )
    return out, lse
