"""Next-token cross-entropy straight from the last hidden states: the output head and the loss in
row chunks, so that no ``(tokens × vocabulary)`` float32 logits tensor exists at once.

A 49,152-token vocabulary (SmolLM2) makes the logits of one 2,048-token step 400 MB in float32, and
the plain ``F.cross_entropy(head(h))`` keeps that, its log-softmax and, under bf16 autocast, a
bfloat16 copy alive until the backward. :func:`linear_cross_entropy` computes each chunk's logits,
its losses and (when gradients are wanted) its share of both gradients in the forward pass, keeping
only the per-row losses, the input's gradient per row and the head's gradient summed over rows. The
backward scales them by the upstream gradient: exactly for the input (its gradient is linear in
each row's upstream value) and for the head when the upstream gradient is the same for every
counted row (a mean or sum of the losses, as training takes); any other upstream gradient (a loss
on some positions only, as the gradient split and the attribution take) recomputes the head's
gradient chunk by chunk with the true weights. Either way the result is the gradient of the plain
loss up to rounding (``tests/test_token_loss.py``: float64 to 1e-12, float32 to its rounding).
The chunk buffers are reused from chunk to chunk and freed when the call returns.

Why not a library's: Liger's and cut-cross-entropy's fused kernels are Triton, GPU only; PyTorch
2.13's own ``F.linear_cross_entropy(options=LinearCrossEntropyOptions())`` runs on the CPU but its
automatic chunk size made a 512 × 576 → 49,152 loss 9× slower than the plain one there (6.3 s
against 0.67 s), and with bfloat16 inputs it returns bfloat16 losses (±0.03 nats at a loss of 11),
too coarse for per-position gaps of 0.01 (BENCHMARKS.md, "The 49k-vocabulary loss").

Precision follows the caller: under autocast the matmuls run in the autocast dtype (as the plain
path's head would), the softmax, the losses and the head's summed gradient in float32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Targets with this id carry no loss and no gradient (``F.cross_entropy``'s default)."""

CHUNK_BYTES = 64 * 2**20
"""One chunk's float32 logits take about this much memory (SmolLM2's 49,152 tokens: 320 rows)."""


def chunk_rows(vocab_size: int, rows: int) -> int:
    """Rows per chunk: a multiple of 64, at least 256 (smaller chunks make the matmuls and the
    head's gradient sums slower: BENCHMARKS.md), and as many as keep one chunk's float32 logits
    near :data:`CHUNK_BYTES`; never more than ``rows``."""
    return max(1, min(rows, max(256, CHUNK_BYTES // (4 * vocab_size) // 64 * 64)))


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The head's matmul dtype: the autocast dtype for inputs autocast would cast (not float64)."""
    if dtype != torch.float64 and device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The softmax's, the losses' and the head gradient's dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Workspace:
    """The chunk buffers of one call, reused from chunk to chunk: a chunk's logits in the matmul dtype,
    its log-probabilities in the wide dtype, the head's weight in the matmul dtype and one chunk's
    head gradient. They are freed when the call returns, so they never add to the peak of the rest of
    the step (the CLI keeps freed memory in the heap, myopia.train.memory, so the next call takes them
    back without page faults)."""

    def __init__(self, rows: int, weight: torch.Tensor, dtype: torch.dtype):
        vocab, d = weight.shape
        device = weight.device
        self.low = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.logp = torch.empty(rows, vocab, dtype=_wide(dtype), device=device)
        self.weight = weight if weight.dtype == dtype else torch.empty(vocab, d, dtype=dtype, device=device).copy_(weight)
        self.head = torch.empty(vocab, d, dtype=dtype, device=device)


def _log_probs(h: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """Log-softmax of ``h @ weight.T`` (the matmul in ``h``'s dtype; the softmax in float32, or float64
    for float64 inputs), in the workspace."""
    n = h.shape[0]
    low = torch.mm(h, ws.weight.T, out=ws.low[:n])
    logp = low if low.dtype == ws.logp.dtype else ws.logp[:n].copy_(low)
    return logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))


def _losses(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    losses = -logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return losses if valid is None else torch.where(valid, losses, 0.0)


def _dlogits(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None, ws: _Workspace,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """d loss_i / d logits_i = softmax − one-hot (rows with an ignored target: 0; rows scaled by
    ``scale``), computed in place over ``logp`` and returned in the matmul dtype."""
    p = logp.exp_()
    p[torch.arange(len(targets), device=p.device), targets.clamp(min=0)] -= 1.0
    if valid is not None:
        p.mul_(valid.unsqueeze(1).to(p.dtype))
    if scale is not None:
        p.mul_(scale.unsqueeze(1))
    return p if ws.low.dtype == p.dtype else ws.low[: len(targets)].copy_(p)


def _add_head_grad(total: torch.Tensor | None, p: torch.Tensor, h: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """``total + p.T @ h`` in the wide dtype (the first chunk's product starts the total)."""
    if total is None:
        return (p.T @ h).to(_wide(p.dtype))
    if p.dtype == total.dtype:
        return total.addmm_(p.T, h)
    return total.add_(torch.mm(p.T, h, out=ws.head))


def _valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Which rows' targets count (None: all of them)."""
    valid = targets != ignore_index
    return None if bool(valid.all()) else valid


def _chunks(n: int, rows: int):
    for s in range(0, n, rows):
        yield s, min(s + rows, n)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            ws = _Workspace(rows, weight, dtype)
            h = hidden.to(dtype)
            valid = _valid(targets, ignore_index)
            losses = torch.empty(len(targets), dtype=_wide(dtype), device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = None
            for s, e in _chunks(len(targets), rows):
                v = None if valid is None else valid[s:e]
                logp = _log_probs(h[s:e], ws)
                losses[s:e] = _losses(logp, targets[s:e], v)
                p = _dlogits(logp, targets[s:e], v, ws)
                if need_h:
                    grad_h[s:e] = p @ ws.weight
                if need_w:
                    grad_w = _add_head_grad(grad_w, p, h[s:e], ws)
            del ws
        ctx.save_for_backward(hidden, weight, targets, grad_h)
        ctx.grad_w = grad_w  # not a saved tensor: the backward scales it in place (and only once)
        ctx.ignore_index, ctx.rows, ctx.dtype = ignore_index, rows, dtype
        return losses

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, grad_h = ctx.saved_tensors
        grad_w = ctx.grad_w
        valid = _valid(targets, ctx.ignore_index)
        g = grad_out.to(_wide(ctx.dtype))
        d_hidden = d_weight = None
        if grad_h is not None:
            d_hidden = (grad_h.to(g.dtype) * g.unsqueeze(1)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            counted = g if valid is None else g[valid]
            if counted.numel() == 0:
                d_weight = torch.zeros_like(weight)
            elif ctx.grad_w is not None and bool((counted == counted[0]).all()):  # a mean or sum: one scale
                # scaled in place (no second 113 MB for SmolLM2) and handed over; a second backward through
                # a retained graph recomputes instead
                ctx.grad_w = None
                d_weight = grad_w.mul_(counted[0]).to(weight.dtype)
            else:  # any other weighting of the rows: recompute with the true weights
                d_weight = _weight_grad(hidden, weight, targets, valid, g, ctx.rows, ctx.dtype).to(weight.dtype)
        return d_hidden, d_weight, None, None, None, None


def _weight_grad(hidden, weight, targets, valid, g, rows, dtype) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        ws = _Workspace(rows, weight, dtype)
        h = hidden.to(dtype)
        out = None
        for s, e in _chunks(len(targets), rows):
            v = None if valid is None else valid[s:e]
            p = _dlogits(_log_probs(h[s:e], ws), targets[s:e], v, ws, scale=g[s:e])
            out = _add_head_grad(out, p, h[s:e], ws)
    return out


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, rows: int | None = None) -> torch.Tensor:
    """Per-row cross-entropy of ``hidden @ weight.T`` against ``targets``, float32 (float64 for float64
    inputs), shape
    ``targets.shape``: the same as ``F.cross_entropy(F.linear(hidden, weight).float(), targets,
    reduction="none", ignore_index=ignore_index)`` without its logits tensor. ``hidden``:
    ``(..., d)``; ``weight``: ``(vocabulary, d)`` (an output head without bias); ``rows``: rows per
    chunk (default :func:`chunk_rows`)."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} hidden rows but {t.shape[0]} targets")
    dtype = _compute_dtype(h.device.type, h.dtype)
    rows = rows or chunk_rows(weight.shape[0], h.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        losses = _LinearCrossEntropy.apply(h, weight, t, ignore_index, rows, dtype)
    else:
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            ws = _Workspace(rows, weight, dtype)
            hc = h.to(dtype)
            valid = _valid(t, ignore_index)
            losses = torch.empty(len(t), dtype=_wide(dtype), device=h.device)
            for s, e in _chunks(len(t), rows):
                losses[s:e] = _losses(_log_probs(hc[s:e], ws), t[s:e], None if valid is None else valid[s:e])
    return losses.reshape(shape)


__all__ = ["CHUNK_BYTES", "IGNORE_INDEX", "chunk_rows", "linear_cross_entropy"]
