"""A linear projection whose output comes twice: once live, once reaching only the weights.

The ``myopic`` mode feeds the second copy's keys/values to attention as the past. The projection
weights then learn from every position's loss while the input learns only from its own, without a
second projection of a detached copy of the input (one matmul forward, the usual two backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ProjectWithWeightOnlyCopy(torch.autograd.Function):
    """``y = x Wᵀ + b`` returned twice: the first output's gradient reaches x, W and b; the second's
    (a view of the same values) reaches only W and b.

    The ``myopic`` mode feeds the second output's keys/values to attention as the past: the
    projection weights then learn from every position's loss while the input learns only from its
    own, without projecting a detached copy of the input a second time.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = F.linear(x, weight, bias)  # under autocast: in the autocast dtype
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.compute_dtype = y.dtype
        return y, y.view_as(y)

    @staticmethod
    def backward(ctx, grad_live, grad_weight_only):
        # The backward matmuls run in the forward's compute dtype (bf16 under autocast), as
        # F.linear's own backward does; each gradient returns in its input's dtype.
        x, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)
        grad_x = None if grad_live is None else (grad_live.to(dtype) @ w_c).to(x.dtype)
        if grad_live is None:
            grad_all = grad_weight_only
        elif grad_weight_only is None:
            grad_all = grad_live
        else:
            grad_all = grad_live + grad_weight_only
        flat = grad_all.reshape(-1, grad_all.shape[-1]).to(dtype)
        grad_w = (flat.t() @ x_c.reshape(-1, x_c.shape[-1])).to(weight.dtype)
        grad_b = flat.sum(0, dtype=torch.promote_types(dtype, torch.float32)).to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b



def project_with_weight_only_copy(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, y_weight_only)`` with ``y = x Wᵀ + b``; equal values, different gradient routes."""
    return ProjectWithWeightOnlyCopy.apply(x, weight, bias)
