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
gradient. :func:`band_kv_grads` recomputes the band's key/value gradient blockwise from the forward's
log-sum-exp (probabilities ``exp(s − lse)`` inside the band only): extra memory O(n·(w + 64)) per head,
extra time O(n·(w + 64)·d), no n×n tensor.

Because the forward values of ``k_past`` and ``k`` are equal, the caller may pass the same tensor
values twice; only the gradient routing differs.

The op is registered with ``torch.library`` (``myopia::myopic_attention`` and its backward
``myopia::myopic_attention_backward``), each with a fake implementation, so ``torch.compile``
traces through it. On CUDA the O(n·d) part runs as one Triton kernel
(:mod:`myopia.attention.triton_diag`); elsewhere, and with a custom mask, as PyTorch element-wise ops.
"""

from __future__ import annotations

import torch

from myopia.attention import kernels, triton_diag
from myopia.attention.reference import expand_kv

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


_BAND_BLOCK = 64  # keys per block in band_kv_grads


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

    Keys go in blocks of ``S`` = 64; block ``n`` meets the queries ``[nS, nS + S + horizon)``, gathered
    as overlapping windows (``unfold``), so scores exist only for a band of width ``S + horizon``.
    """
    compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    B, H, T, D = q.shape
    S = min(_BAND_BLOCK, T)
    nb = -(-T // S)
    W = S + horizon
    pad_k, pad_q = nb * S - T, nb * S + horizon - T

    def windows(t: torch.Tensor) -> torch.Tensor:  # (B, H, T, *) -> (B, H, nb, W, *)
        t = t.to(compute)
        if t.dim() == 3:
            return torch.nn.functional.pad(t, (0, pad_q)).unfold(2, W, S)
        return torch.nn.functional.pad(t, (0, 0, 0, pad_q)).unfold(2, W, S).transpose(-1, -2)

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (B, H, T, d) -> (B, H, nb, S, d)
        t = torch.nn.functional.pad(t.to(compute), (0, 0, 0, pad_k))
        return t.view(*t.shape[:2], nb, S, t.shape[-1])

    q_w, do_w = windows(q), windows(dout)
    lse_w = windows(lse).unsqueeze(-2)  # (B, H, nb, 1, W)
    delta_w = windows((dout.to(compute) * out.to(compute)).sum(-1)).unsqueeze(-2)
    k_b, v_b = blocks(k), blocks(v)
    key = (torch.arange(nb, device=q.device).view(nb, 1, 1) * S + torch.arange(S, device=q.device).view(1, S, 1))
    query = key - torch.arange(S, device=q.device).view(1, S, 1) + torch.arange(W, device=q.device).view(1, 1, W)
    inside = (query - key >= 0) & (query - key <= horizon) & (query < T) & (key < T)  # (nb, S, W)
    scores = torch.einsum("bhnkd,bhnqd->bhnkq", k_b, q_w) * scale
    if mask is not None:
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        scores = scores + m4[:, :, query.clamp(max=T - 1), key.clamp(max=T - 1)].to(compute)
    finite = torch.isfinite(lse_w)  # a fully masked query row attends to nothing
    p = torch.where(inside & finite, torch.exp(scores - torch.where(finite, lse_w, 0.0)), 0.0)
    ds = p * (torch.einsum("bhnqd,bhnkd->bhnkq", do_w, v_b) - delta_w)
    dv = torch.einsum("bhnkq,bhnqd->bhnkd", p, do_w)
    dk = torch.einsum("bhnkq,bhnqd->bhnkd", ds, q_w) * scale
    dk = dk.reshape(B, H, nb * S, D)[:, :, :T]
    dv = dv.reshape(B, H, nb * S, v.shape[-1])[:, :, :T]
    return dk.to(k.dtype), dv.to(v.dtype)


_EMPTY = 0  # length of the placeholder tensors a custom op returns for "no tensor"


def _kv_mask_diag(mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.expand(*mask.shape[:-2], T, T).diagonal(dim1=-2, dim2=-1)


def _fused_backward(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale):
    """``(lse, dq, dk_full, dv_full)``: the fused (vanilla) backward over expanded keys/values."""
    groups = q.shape[1] // k.shape[1]
    lse, extras = kernels.unpack_extras(lse_store, aux0, aux1, q, mask)
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
    lse, dq, dk_full, dv_full = _fused_backward(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale)
    need_cross = beta > 0.0 or want_past_k or want_past_v
    if horizon == 0 and mask is None and triton_diag.available(q):
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
    return (
        dq,
        dk_live.contiguous(),
        dv_live.contiguous(),
        q.new_empty(_EMPTY) if dk_past is None else dk_past.contiguous(),
        q.new_empty(_EMPTY) if dv_past is None else dv_past.contiguous(),
    )


@_myopic_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale, beta, horizon, want_past_k, want_past_v):
    _, dq, _, _ = _fused_backward(dout, q, k, v, out, lse_store, aux0, aux1, mask, scale)
    kv = lambda want: torch.empty(k.shape, dtype=k.dtype, device=k.device) if want else q.new_empty(_EMPTY)
    return dq, kv(True), kv(True), kv(want_past_k), kv(want_past_v)


def _split_kv_grads_torch(q, k_e, v_e, out, dout, lse, dk_full, dv_full, *, scale, beta, mask, horizon, groups,
                          need_cross, want_past_k, want_past_v):
    if horizon > 0:
        dk_own, dv_own = band_kv_grads(q, k_e, v_e, out, dout, lse, scale, horizon, mask)
    else:
        dk_own, dv_own = own_position_kv_grads(q, k_e, v_e, out, dout, lse, scale, _kv_mask_diag(mask, q.shape[-2]))
    dk_own, dv_own = _reduce_groups(dk_own, groups), _reduce_groups(dv_own, groups)
    dk_live, dv_live, dk_past, dv_past = dk_own, dv_own, None, None
    if need_cross:
        dk_cross = _reduce_groups(dk_full, groups) - dk_own
        dv_cross = _reduce_groups(dv_full, groups) - dv_own
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
