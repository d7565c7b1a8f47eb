"""Optimiser and learning-rate schedule (a pure function of the step, so resuming needs no state)."""

from __future__ import annotations

import math

import torch

from myopia.train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=(cfg.fused and fused_supported(decay + no_decay)) or None)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether PyTorch's fused AdamW (one kernel over all parameters) can take ``params``: plain
    floating-point tensors on one CPU or CUDA device (not FSDP's sharded DTensors). On 2 CPU cores it
    updates SmolLM2-135M in 0.06 s where the default per-parameter loop takes 0.49 s
    (BENCHMARKS.md); the update is the same AdamW step up to float rounding."""
    from torch.distributed.tensor import DTensor

    devices = {p.device.type for p in params}
    return (bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"}
            and all(p.is_floating_point() and not isinstance(p, DTensor) for p in params))


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup·total`` steps, then cosine decay to ``min_lr_ratio·lr``."""
    warmup = int(round(cfg.warmup * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
