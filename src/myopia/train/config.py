"""Configs of the shared training loop."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (applied to matrices and embeddings, not to biases or norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup: float = 0.01
    """Linear warmup length as a fraction of all steps."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the cosine decay, as a fraction of the peak."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0 = no clipping)."""
    fused: bool = True
    """PyTorch's fused AdamW kernel where it applies (every parameter on one CPU or CUDA device, no FSDP
    shards): the same update up to float rounding (1 ulp), 8x faster for SmolLM2-135M on 2 cores; false =
    the per-parameter loop (the synthetic presets were calibrated with it, and keep it bit for bit)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1)")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup={self.warmup} must be a fraction in [0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")


@dataclass
class TrainConfig:
    """Budget, batching, evaluation, checkpoints and hardware of a run."""

    steps: int = 1000
    """Optimiser steps per arm."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimiser step."""
    eval_every: int = 0
    """Evaluate on held-out data every this many steps (0 = only at the end)."""
    eval_at: list[int] = field(default_factory=list)
    """Also evaluate after these steps (e.g. log-spaced 1,2,4,8,16: the gap against fine-tuning tokens)."""
    eval_batches: int = 16
    """Held-out batches per evaluation (the same ones every time)."""
    eval_on_start: bool = False
    """Also evaluate before the first step (step 0) of a fresh run: the starting model's held-out
    loss, from which a fine-tuning run's curve starts (as the Hugging Face Trainer's eval_on_start)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep per arm."""
    seed: int = 0
    """Seed of initialisation and data order (the same for every arm)."""
    device: str = "auto"
    """auto (CUDA if available, else CPU) | cpu | cuda | cuda:N."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA and on a CPU with bf16 matrix units, AVX512-BF16 or AMX; float32 on
    other CPUs, where bf16 is emulated and slow) | fp32 | bf16 (autocast: float32 weights and AdamW state)."""
    progress: bool = True
    """Show a progress bar with loss, throughput and ETA."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms; cuBLAS workspace config) for
    gradient-exact comparisons on GPU; slower. Kernels without a deterministic version warn."""
    parallel: str = "ddp"
    """Under torchrun with several processes: ddp (replicated) | fsdp (FSDP2 fully_shard per block)."""
    log_to: list[str] = field(default_factory=list)
    """Also stream metrics to trackers: tensorboard, wandb (optional extras; empty = metrics.jsonl only)."""
    discard_damaged: bool = False
    """With --resume: an arm whose checkpoints folder holds no intact checkpoint (damaged or interrupted
    saves) moves it and its metrics.jsonl aside (checkpoints.damaged-<time>/) and trains again from
    step 0. Without it such an arm stops with an error that names the damage, changing nothing."""
    allow_changes: list[str] = field(default_factory=list)
    """With --resume: configuration keys (dotted, e.g. optim.lr) allowed to differ from the run's
    config.yaml; each change is recorded in config_changes.jsonl and results.json. Other changes that
    alter the trajectory are refused (docs/cluster.md)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if any(s < 1 for s in self.eval_at):
            raise ValueError(f"eval_at={self.eval_at} must list steps >= 1 (step 0: eval_on_start)")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        unknown = [t for t in self.log_to if t not in ("tensorboard", "wandb")]
        if unknown:
            raise ValueError(f"log_to={unknown[0]!r} is not one of tensorboard, wandb")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r} is not one of ddp, fsdp")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision={self.precision!r} is not one of auto, fp32, bf16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
