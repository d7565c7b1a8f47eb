"""``myopia sweep``'s configuration: the experiment's dataclass, its presets and the paper's gaps."""

from __future__ import annotations

from dataclasses import dataclass, field

from myopia.experiments import lm

# Held-out myopia gap per Pythia size in the paper (one 32-sequence batch; §4.2 of our notes).
PAPER_GAPS = {"pythia-14m": 0.157, "pythia-31m": 0.113, "pythia-70m": 0.057, "pythia-160m": 0.118,
              "pythia-410m": 0.119, "pythia-1b": 0.162, "pythia-1.4b": 0.170, "pythia-2.8b": 0.249}


@dataclass
class SweepExperiment(lm.LMExperiment):
    """The myopia gap across model sizes: one `myopia lm` run per model, gathered in one table and plot."""

    models: list[str] = field(default_factory=lambda: ["pythia-14m", "pythia-31m", "pythia-70m"])
    """Models, smallest first: Hugging Face presets, local checkpoint directories or hf:NAME."""
    lr_from_preset: float = 0.0
    """If > 0, each preset model, and each released Pythia model named hf:EleutherAI/pythia-SIZE, trains
    at this multiple of its authors' learning rate (the paper fine-tuned Pythia at 0.4×); 0 = optim.lr
    for every model (also for local folders and other hub models). Both arms always share it."""
    epochs: int = 0
    """If > 0 (with data.windows document_starts), train.steps is set to this many epochs over the
    training windows: epochs × windows // (train.batch_size × train.grad_accum), the same for every
    model; each window is read once per epoch, and the last partial batch (fewer windows than one step)
    is dropped. 0 = train.steps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0 (0 = train.steps)")


_PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b")

# The Pythia shapes (Biderman et al. 2023) trained from fresh weights on the built-in corpus, at 0.4x the
# authors' learning rates (a GPU run). Not the paper's experiment, which fine-tuned the released
# pretrained models: that is pythia-finetune. `pythia-scaling` is this preset's old name.
_PYTHIA_SHAPES_SCRATCH = {
    "out": "runs/sweep-pythia",
    "models": [f"pythia-{size}" for size in _PYTHIA_SIZES],
    "arms": ["vanilla", "myopic"], "lr_from_preset": 0.4,
    "data": {"corpus": "builtin", "tokenizer": "gpt-neox", "seq_len": 64},
    "optim": {"weight_decay": 0.01, "warmup": 0.05},
    "train": {"steps": 2000, "batch_size": 256, "eval_every": 500, "eval_batches": 16, "checkpoint_every": 500},
}

PRESETS: dict[str, dict] = {
    # The paper's §4.2 experiment (docs/pythia.md; needs the Hugging Face hub and a GPU): the released
    # pretrained Pythia models, 14m ... 2.8b, each fine-tuned vanilla and myopic for one epoch over the
    # first 64 tokens of every training document with >= 64 tokens (seq_len 63: 63 inputs and their 63
    # next tokens, as the paper's 64-token sequences), in an order shuffled by the seed, no BOS/EOS;
    # AdamW, weight decay 0.01, lr 0.4x each model's Pythia rate, 5% warm-up then cosine, 512 sequences
    # per step (128 x 4 accumulated), identical in both arms (the paper's myopic arm most likely ran at
    # 6e-4 and 1% warm-up instead). Data: MiniPile (1M Pile documents) instead of the paper's 10M
    # Pile documents; 2% held out, each held-out document's first 64 tokens; 16,000 of them (>= 1M
    # predicted tokens) are scored instead of the paper's one batch of 32.
    "pythia-finetune": {
        "out": "runs/sweep-pythia-finetune",
        "models": [f"hf:EleutherAI/pythia-{size}" for size in _PYTHIA_SIZES],
        "arms": ["vanilla", "myopic"], "lr_from_preset": 0.4, "epochs": 1,
        "data": {"corpus": "hf:JeanKaddour/minipile", "tokenizer": "gpt-neox", "seq_len": 63,
                 "windows": "document_starts", "heldout_fraction": 0.02},
        "optim": {"weight_decay": 0.01, "warmup": 0.05},
        "train": {"batch_size": 128, "grad_accum": 4, "eval_every": 200, "eval_on_start": True, "eval_batches": 16,
                  "checkpoint_every": 200, "log_every": 10},
        "analysis": {"heldout_windows": 16000},
    },
    "pythia-shapes-scratch": _PYTHIA_SHAPES_SCRATCH,
    "pythia-scaling": _PYTHIA_SHAPES_SCRATCH,  # the old name of pythia-shapes-scratch (fresh weights)
    # ~20 minutes on 2 CPU cores: the two smallest Pythia shapes (embedding sized to a 4k BPE), each
    # pretrained vanilla for 800 steps, then fine-tuned vanilla and myopic for 200 steps, seeds 0, 1
    # (docs/lm.md: it shows the machinery; at this budget the larger shape is the worse model).
    "cpu": {
        "out": "runs/sweep-cpu",
        "models": ["pythia-14m", "pythia-31m"],
        "arms": ["vanilla", "myopic"], "seeds": [0, 1],
        "data": {"corpus": "builtin", "tokenizer": "bpe", "vocab_size": 4096, "seq_len": 64},
        "pretrain": {"steps": 800, "lr": 3e-3},
        "optim": {"lr": 1e-3},
        "train": {"steps": 200, "batch_size": 16, "eval_every": 400, "eval_batches": 8, "checkpoint_every": 400,
                  "log_every": 25, "precision": "fp32"},  # as measured (auto: bf16 on CPUs with bf16 units)
        "analysis": {"heldout_windows": 500, "bootstrap": 500, "probe_train_windows": 200},
    },
}


__all__ = ["PAPER_GAPS", "PRESETS", "SweepExperiment"]
