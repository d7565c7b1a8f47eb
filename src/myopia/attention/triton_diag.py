"""One Triton kernel for the myopic backward's O(n·d) part (CUDA; optional).

For each key/value head ``h_kv`` and position ``t`` it computes, in float32 registers, the keys' and
values' own-position gradient terms summed over the ``groups`` query heads that share ``h_kv``:

    p  = exp(c·q·k − lse)                 (the diagonal attention weight)
    dv_own = Σ_g p·do
    dk_own = Σ_g c·p·(do·v − do·o)·q

and, when the full key/value gradients of the fused backward are given, the cross-position rest
``cross = Σ_g full − own`` split into ``live = own + β·cross`` and ``past = (1 − β)·cross``. Every
input is read once and every output written once, so the pass costs about as much as copying the
tensors it touches; the unfused PyTorch version of the same formulas makes ~15 passes in float32.

The kernel needs ``triton``; :func:`available` says whether it can run for a given tensor. Set
``TRITON_INTERPRET=1`` to run it on the CPU (slowly) in tests.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the installation
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(q: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    if triton is None or q.shape[-1] > 256 or (v is not None and v.shape[-1] > 256):
        return False
    return q.device.type == "cuda" or (_INTERPRET and q.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _diag_kernel(
        Q, K, V, O, DO, LSE, DKF, DVF,  # inputs (DKF/DVF: full grads, expanded heads; may be dummies)
        DK_LIVE, DV_LIVE, DK_PAST, DV_PAST,  # outputs, (B, HKV, T, D) and (B, HKV, T, DV) contiguous
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t, sdo_b, sdo_h, sdo_t,
        sl_b, sl_h, sf_b, sf_h, sf_t, sg_b, sg_h, sg_t,
        HKV, T, D, DV, scale, beta,
        GROUPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_FULL: tl.constexpr, WANT_PAST_K: tl.constexpr, WANT_PAST_V: tl.constexpr,
    ):
        # One program: BLOCK_T positions of one (batch, key/value head). Every offset is int64: a
        # tensor may hold 2**31 elements or more (e.g. B=16, H=32, T=32k, D=128).
        pid_t = tl.program_id(0).to(tl.int64)
        bh = tl.program_id(1).to(tl.int64)
        hk = bh % HKV
        b = bh // HKV
        ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        ds = tl.arange(0, BLOCK_D).to(tl.int64)
        es = tl.arange(0, BLOCK_DV).to(tl.int64)  # value/output columns
        tm = ts < T
        mk = tm[:, None] & (ds[None, :] < D)
        mv = tm[:, None] & (es[None, :] < DV)
        tcol = ts[:, None]
        dcol = ds[None, :]
        ecol = es[None, :]
        k = tl.load(K + b * sk_b + hk * sk_h + tcol * sk_t + dcol, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(V + b * sv_b + hk * sv_h + tcol * sv_t + ecol, mask=mv, other=0.0).to(tl.float32)
        dk = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_T, BLOCK_DV], dtype=tl.float32)
        dkf = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dvf = tl.zeros([BLOCK_T, BLOCK_DV], dtype=tl.float32)
        for g in range(GROUPS):
            h = hk * GROUPS + g
            q = tl.load(Q + b * sq_b + h * sq_h + tcol * sq_t + dcol, mask=mk, other=0.0).to(tl.float32)
            o = tl.load(O + b * so_b + h * so_h + tcol * so_t + ecol, mask=mv, other=0.0).to(tl.float32)
            do = tl.load(DO + b * sdo_b + h * sdo_h + tcol * sdo_t + ecol, mask=mv, other=0.0).to(tl.float32)
            lse = tl.load(LSE + b * sl_b + h * sl_h + ts, mask=tm, other=0.0).to(tl.float32)
            score = tl.sum(q * k, axis=1) * scale
            p = tl.where(lse == float("-inf"), 0.0, tl.exp(score - lse))
            dv += p[:, None] * do
            w = scale * p * (tl.sum(do * v, axis=1) - tl.sum(do * o, axis=1))
            dk += w[:, None] * q
            if HAS_FULL:
                dkf += tl.load(DKF + b * sf_b + h * sf_h + tcol * sf_t + dcol, mask=mk, other=0.0).to(tl.float32)
                dvf += tl.load(DVF + b * sg_b + h * sg_h + tcol * sg_t + ecol, mask=mv, other=0.0).to(tl.float32)
        out_k = (b * HKV + hk) * T * D + tcol * D + dcol
        out_v = (b * HKV + hk) * T * DV + tcol * DV + ecol
        if HAS_FULL:
            dk_cross = dkf - dk
            dv_cross = dvf - dv
            tl.store(DK_LIVE + out_k, (dk + beta * dk_cross).to(DK_LIVE.dtype.element_ty), mask=mk)
            tl.store(DV_LIVE + out_v, (dv + beta * dv_cross).to(DV_LIVE.dtype.element_ty), mask=mv)
            if WANT_PAST_K:
                tl.store(DK_PAST + out_k, ((1.0 - beta) * dk_cross).to(DK_PAST.dtype.element_ty), mask=mk)
            if WANT_PAST_V:
                tl.store(DV_PAST + out_v, ((1.0 - beta) * dv_cross).to(DV_PAST.dtype.element_ty), mask=mv)
        else:
            tl.store(DK_LIVE + out_k, dk.to(DK_LIVE.dtype.element_ty), mask=mk)
            tl.store(DV_LIVE + out_v, dv.to(DV_LIVE.dtype.element_ty), mask=mv)


def split_kv_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    dk_full: torch.Tensor | None,
    dv_full: torch.Tensor | None,
    *,
    scale: float,
    beta: float,
    want_past_k: bool,
    want_past_v: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dk_live, dv_live, dk_past, dv_past)`` in the key/value heads' shape (values may have a
    head size of their own).

    ``q, out, dout, lse, dk_full, dv_full`` have the query heads (``dk_full``/``dv_full`` from the
    fused backward over expanded keys/values); ``k, v`` have the key/value heads. Without the full
    gradients only the own-position terms are returned (the ``myopic_kv`` case, ``beta = 0``).
    """
    B, H, T, D = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    groups = H // HKV
    has_full = dk_full is not None
    last_dim_contiguous = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    q, k, v, out, dout, lse, dk_full, dv_full = map(last_dim_contiguous, (q, k, v, out, dout, lse, dk_full, dv_full))
    dk_live = torch.empty(B, HKV, T, D, dtype=k.dtype, device=k.device)
    dv_live = torch.empty(B, HKV, T, DV, dtype=v.dtype, device=v.device)
    dk_past = torch.empty_like(dk_live) if has_full and want_past_k else None
    dv_past = torch.empty_like(dv_live) if has_full and want_past_v else None
    dkf, dvf = (dk_full, dv_full) if has_full else (q, q)  # q: a placeholder the kernel does not read
    block_t = 32 if max(D, DV) <= 128 else 16
    grid = (triton.cdiv(T, block_t), B * HKV)
    _diag_kernel[grid](
        q, k, v, out, dout, lse, dkf, dvf,
        dk_live, dv_live, dk_past if dk_past is not None else dk_live, dv_past if dv_past is not None else dv_live,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *dout.stride()[:3],
        *lse.stride()[:2], *dkf.stride()[:3], *dvf.stride()[:3],
        HKV, T, D, DV, float(scale), float(beta),
        GROUPS=groups, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV),
        HAS_FULL=has_full,
        WANT_PAST_K=dk_past is not None, WANT_PAST_V=dv_past is not None,
    )
    return dk_live, dv_live, dk_past, dv_past
