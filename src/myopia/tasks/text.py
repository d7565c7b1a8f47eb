"""Language modelling on local text with byte-level tokens (vocabulary 256).

Documents (files, or blank-line-separated paragraphs of a single file) are split into train and
held-out sets as whole documents; training windows are drawn at random offsets as a pure function of
(seed, step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from myopia.tasks.base import HELDOUT_STREAM, TRAIN_STREAM, batch_generator


class DataError(ValueError):
    """Unusable input data; the message is one line naming the input and the fix."""


@dataclass
class TextConfig:
    """Local text for byte-level language modelling."""

    path: str | None = None
    """A UTF-8 text file, or a folder searched for *.txt files."""
    seq_len: int = 64
    """Window length in tokens."""
    heldout_fraction: float = 0.05
    """Fraction of documents held out for evaluation."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must lie in (0, 1)")


def read_documents(path: str | None, key: str = "data.path") -> list[str]:
    if not path:
        raise DataError(f"{key} is not set; pass a UTF-8 text file or a folder of .txt files")
    if not os.path.exists(path):
        raise DataError(f"{key}: {path!r} does not exist; pass a UTF-8 text file or a folder of .txt files")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(".txt"))
    if not files:
        raise DataError(f"{key}: {path!r} holds no .txt files")
    docs = []
    for fpath in files:
        try:
            with open(fpath, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise DataError(f"{key}: {fpath!r} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8") from None
        parts = [p for p in text.split("\n\n") if p.strip()] if len(files) == 1 else [text]
        docs.extend(p for p in parts if p.strip())
    if not docs:
        raise DataError(f"{key}: {path!r} holds no text")
    return docs


class ByteTextTask:
    name = "text"

    def __init__(self, cfg: TextConfig, seed: int):
        self.cfg, self.seed, self.seq_len = cfg, seed, cfg.seq_len
        docs = read_documents(cfg.path)
        order = np.random.default_rng(seed).permutation(len(docs))
        n_held = max(1, int(round(cfg.heldout_fraction * len(docs)))) if len(docs) > 1 else 0
        held = [docs[i] for i in order[:n_held]]
        train = [docs[i] for i in order[n_held:]]
        self.train_tokens = self._encode(train)
        # A single document is split by position: its last part is held out.
        if not held:
            cut = int(len(self.train_tokens) * (1 - cfg.heldout_fraction))
            self.train_tokens, self.heldout_tokens = self.train_tokens[:cut], self.train_tokens[cut:]
        else:
            self.heldout_tokens = self._encode(held)
        for name, toks in (("training", self.train_tokens), ("held-out", self.heldout_tokens)):
            if len(toks) <= cfg.seq_len + 1:
                raise DataError(f"data.path: {cfg.path!r} gives only {len(toks)} {name} tokens, fewer than "
                                f"seq_len+2={cfg.seq_len + 2}; use more text or a shorter data.seq_len")

    @staticmethod
    def _encode(docs: list[str]) -> torch.Tensor:
        data = "\n\n".join(docs).encode("utf-8")
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))

    def model_overrides(self) -> dict:
        return {"vocab_size": 256, "block_size": self.cfg.seq_len, "input_dim": None, "output_dim": None}

    def _windows(self, tokens: torch.Tensor, batch_size: int, gen: torch.Generator):
        starts = torch.randint(0, len(tokens) - self.seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        w = tokens[idx]
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step: int, micro: int, batch_size: int):
        return self._windows(self.train_tokens, batch_size, batch_generator(self.seed, TRAIN_STREAM, step, micro))

    def heldout_batch(self, index: int, batch_size: int):
        return self._windows(self.heldout_tokens, batch_size, batch_generator(self.seed, HELDOUT_STREAM, index))

    def loss_per_position(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred.float().transpose(1, 2), y, reduction="none")
