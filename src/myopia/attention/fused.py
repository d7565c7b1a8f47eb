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

Because the forward values of ``k_past`` and ``k`` are equal, the caller may pass the same tensor
values twice; only the gradient routing differs.
"""

from __future__ import annotations

import torch

from myopia.attention import kernels
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


class FusedMyopicAttention(torch.autograd.Function):
    """``out = causal_attention(q, k, v)`` with the myopic backward described in the module doc."""

    @staticmethod
    def forward(ctx, q, k, v, k_past, v_past, mask, scale, beta):  # noqa: D401 - autograd API
        groups = q.shape[1] // k.shape[1]
        k_e, v_e = expand_kv(k, groups), expand_kv(v, groups)
        out, lse, extras = kernels.fused_forward(q, k_e, v_e, scale=scale, mask=mask)
        ctx.save_for_backward(q, k_e, v_e, out, lse, mask)
        ctx.extras = extras
        ctx.scale, ctx.beta, ctx.groups = scale, float(beta), groups
        ctx.has_past = (k_past is not None, v_past is not None)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_e, v_e, out, lse, mask = ctx.saved_tensors
        beta, groups, scale = ctx.beta, ctx.groups, ctx.scale
        need_cross = beta > 0.0 or any(ctx.has_past)
        dq, dk_full, dv_full = kernels.fused_backward(
            dout, q, k_e, v_e, out, lse, ctx.extras, scale=scale, mask=mask
        )
        mask_diag = None
        if mask is not None:
            T = q.shape[-2]
            mask_diag = mask.expand(*mask.shape[:-2], T, T).diagonal(dim1=-2, dim2=-1)
        dk_own, dv_own = own_position_kv_grads(q, k_e, v_e, out, dout, lse, scale, mask_diag)
        dk_own, dv_own = _reduce_groups(dk_own, groups), _reduce_groups(dv_own, groups)
        dk_live, dv_live, dk_past, dv_past = dk_own, dv_own, None, None
        if need_cross:
            dk_cross = _reduce_groups(dk_full, groups) - dk_own
            dv_cross = _reduce_groups(dv_full, groups) - dv_own
            if beta > 0.0:
                dk_live = dk_own + beta * dk_cross
                dv_live = dv_own + beta * dv_cross
            if ctx.has_past[0]:
                dk_past = (1.0 - beta) * dk_cross
            if ctx.has_past[1]:
                dv_past = (1.0 - beta) * dv_cross
        return dq, dk_live, dv_live, dk_past, dv_past, None, None, None


def fused_myopic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    beta: float = 0.0,
    mask: torch.Tensor | None = None,
    k_past: torch.Tensor | None = None,
    v_past: torch.Tensor | None = None,
) -> torch.Tensor:
    return FusedMyopicAttention.apply(q, k, v, k_past, v_past, mask, scale, beta)


def fused_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: ``(out, lse)`` from the fused kernel (used by tests and diagnostics)."""
    groups = q.shape[1] // k.shape[1]
    out, lse, _ = kernels.fused_forward(
        q, expand_kv(k, groups), expand_kv(v, groups), scale=scale, mask=mask
    )
    return out, lse
