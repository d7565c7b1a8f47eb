"""Eager reference attention: the n×n recipe of the paper's code, kept for tests and fallbacks.

Myopic scores are ``q_i·k̄_j`` on cut edges and ``q_i·k_j`` inside the band ``0 ≤ i − j ≤ w`` (the
cut's horizon; w = 0, the paper's myopia, keeps the diagonal only); the output is
``Σ_{cut} a_ij v̄_j + Σ_{band} a_ij v_j``, where ``k̄, v̄`` are the past keys/values: the projection of
the detached attention input through live weights (``myopic``), or the detached keys/values
themselves (``myopic_kv``). ``beta`` blends ``k̄ ← (1-β)·k̄ + β·k`` as in the paper's code. It
materialises the full score matrix, so memory grows as n².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat each key/value head for the ``groups`` query heads that share it (GQA)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def causal_additive_mask(T: int, dtype: torch.dtype, device: torch.device, offset: int = 0) -> torch.Tensor:
    """``(T, offset+T)``: queries at positions ``offset .. offset+T-1`` see keys up to their own position
    (``offset`` > 0: decoding after ``offset`` cached positions)."""
    upper = torch.ones(T, offset + T, dtype=torch.bool, device=device).triu(offset + 1)
    return torch.zeros(T, offset + T, dtype=dtype, device=device).masked_fill(upper, float("-inf"))


def _softmax(scores: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over keys, in float32 at least (bf16/fp16 scores are upcast). A row that may attend
    to nothing (fully masked, e.g. a padded query) gets all-zero weights, as in the fused kernels.
    ``sinks`` (one logit per query head, GPT-OSS): an extra column in every row's softmax whose
    weight is then dropped."""
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        logits = torch.cat([scores, sink], dim=-1)
        low = logits.dtype in (torch.float16, torch.bfloat16)
        return torch.softmax(logits.float() if low else logits, dim=-1)[..., :-1].to(scores.dtype)
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(dead, 0.0)
    if scores.dtype in (torch.float16, torch.bfloat16):
        weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    else:
        weights = torch.softmax(scores, dim=-1)
    return weights.masked_fill(dead, 0.0)


def _cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cut,
    scale: float,
    mask: torch.Tensor | None = None,
    k_past: torch.Tensor | None = None,
    v_past: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with a materialised score matrix. ``cut``: one layer's :class:`~myopia.attention.cut.Cut`
    (or its text); ``mask``: additive, containing causality. ``softcap`` (Gemma-2): scaled scores
    become ``softcap·tanh(scores/softcap)`` before the mask; ``sinks``: see :func:`_softmax`. Vanilla
    mode also takes fewer queries than keys (decoding)."""
    from myopia.attention.cut import MYOPIC_MODES, Cut

    cut = Cut.parse(cut)
    groups = q.shape[1] // k.shape[1]
    if cut.changes_forward:
        return expand_kv(v, groups)
    T = q.shape[-2]
    cut = cut.at_length(T)
    mode, beta = cut.mode, cut.beta
    if mask is None:
        mask = causal_additive_mask(T, q.dtype, q.device)
    k_e, v_e = expand_kv(k, groups), expand_kv(v, groups)
    if mode == "vanilla":
        scores = _cap(q @ k_e.transpose(-1, -2) * scale, softcap) + mask
        weights = F.dropout(_softmax(scores, sinks), dropout_p)
        return weights @ v_e
    if mode == "myopic" and k_past is not None:
        k_bar, v_bar = expand_kv(k_past, groups), expand_kv(v_past, groups)
    else:
        k_bar, v_bar = k_e.detach(), v_e.detach()
    if beta > 0.0:
        k_bar = (1.0 - beta) * k_bar + beta * k_e
        v_bar = (1.0 - beta) * v_bar + beta * v_e
    assert mode in MYOPIC_MODES
    if cut.horizon is None:  # the diagonal only: the paper's recipe
        eye = torch.eye(T, dtype=torch.bool, device=q.device)
        own_scores = (q * k_e).sum(-1)
        scores = torch.where(eye, own_scores.unsqueeze(-1), q @ k_bar.transpose(-1, -2))
        weights = F.dropout(_softmax(_cap(scores * scale, softcap) + mask, sinks), dropout_p)
        own_weight = weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        return weights.masked_fill(eye, 0.0) @ v_bar + own_weight * v_e
    offset = torch.arange(T, device=q.device).view(T, 1) - torch.arange(T, device=q.device).view(1, T)
    band = (offset >= 0) & (offset <= cut.horizon)  # query i reads key j live
    scores = torch.where(band, q @ k_e.transpose(-1, -2), q @ k_bar.transpose(-1, -2))
    weights = F.dropout(_softmax(_cap(scores * scale, softcap) + mask, sinks), dropout_p)
    return weights.masked_fill(~band, 0.0) @ v_e + weights.masked_fill(band, 0.0) @ v_bar
