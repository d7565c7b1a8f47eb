"""Language modelling on a corpus of documents: tokenized once into a memory-mapped cache, split by
document into training and held-out text, read as fixed-length windows.

Training windows start at random offsets of the concatenated training tokens, a pure function of
(seed, step); held-out windows are the consecutive non-overlapping windows of every held-out
document, each labelled with its document (for bootstrap intervals over documents).

``windows="document_starts"`` is the paper's Pythia data instead: one window per document, its first
``seq_len + 1`` tokens, for every document that long (training and held-out alike); the training
windows are read in a fixed order (a permutation per seed and epoch), each once per epoch.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from myopia.data.cache import default_cache_dir, load_or_build
from myopia.data.corpus import DataError, fingerprint, load_documents, split_documents
from myopia.data.tokenizer import build_tokenizer
from myopia.tasks.base import HELDOUT_STREAM, TRAIN_STREAM, batch_generator

__all__ = ["HELDOUT_PARTS", "WINDOWS", "DataError", "TextConfig", "TextTask", "default_cache_dir", "heldout_part"]


HELDOUT_PARTS = ("all", "tune", "report")
WINDOWS = ("random", "document_starts")
_ORDER_STREAM = 10  # the document_starts epoch permutations (batch_generator's streams are 0-2)


def heldout_part(docs: list, part: str) -> list:
    """The held-out documents of one part: ``all``; ``report`` (the 1st, 3rd, ...) or ``tune`` (the
    2nd, 4th, ...), two disjoint halves, so that a recipe chosen on ``tune`` is reported on text it
    was not chosen on."""
    if part == "all" or len(docs) < 2:
        if part != "all":
            raise DataError(f"data.heldout_part={part!r} needs two or more held-out documents; raise "
                            "data.heldout_fraction or use data.heldout_part all")
        return docs
    return docs[0::2] if part == "report" else docs[1::2]


@dataclass
class TextConfig:
    """Text for language modelling."""

    corpus: str = "builtin"
    """builtin (the shipped English corpus) | a UTF-8 file or folder of .txt files | hf:<dataset name>."""
    tokenizer: str = "bpe"
    """byte | bpe (byte-level BPE trained on the training documents) | gpt2 | gpt-neox (Pythia's) |
    smollm2 (SmolLM2's, with hf_model smollm2-135m) | hf:<name or folder>."""
    vocab_size: int = 8192
    """Vocabulary size of a trained bpe tokenizer."""
    seq_len: int = 64
    """Window length in tokens (the paper: 64)."""
    heldout_fraction: float = 0.05
    """Fraction of documents held out for evaluation (split by document)."""
    cache_dir: str = ""
    """Where tokenizers and token caches live (empty = $MYOPIA_CACHE or ~/.cache/myopia)."""
    heldout_part: str = "all"
    """Which held-out documents are scored: all | tune (every other one, from the second: choose a
    recipe on these) | report (the others: report figures on these, which the recipe never saw)."""
    windows: str = "random"
    """random (training windows at random offsets of the training text; held-out: every non-overlapping
    window of each held-out document) | document_starts (the paper's Pythia data: one window per
    document, its first seq_len + 1 tokens, of every document that long, training and held-out alike;
    training reads them in a shuffled order fixed by the seed, a new one each epoch, each window once
    per epoch; with seq_len 63 a window is a document's first 64 tokens, as the paper's)."""
    micro_batches: int = 0
    """document_starts only: micro-batches per optimiser step, so that the micro-batches of one step read
    consecutive windows of the epoch's order; 0 = train.grad_accum (an experiment fills it in; any other
    value must equal train.grad_accum)."""

    def for_grad_accum(self, grad_accum: int) -> "TextConfig":
        """This config with ``micro_batches`` filled in for a loop of ``grad_accum`` micro-batches a step;
        under document_starts a different explicit value is a one-line error."""
        if self.windows == "document_starts" and self.micro_batches not in (0, grad_accum):
            raise DataError(f"data.micro_batches={self.micro_batches} but train.grad_accum={grad_accum}: with "
                              "data.windows document_starts they must be equal (else windows are skipped or read "
                              "twice); leave --data.micro_batches at 0, which follows train.grad_accum")
        return replace(self, micro_batches=grad_accum) if self.micro_batches == 0 else self

    def __post_init__(self) -> None:
        if self.windows not in WINDOWS:
            raise ValueError(f"windows={self.windows!r} is not one of {', '.join(WINDOWS)}")
        if self.micro_batches < 0:
            raise ValueError(f"micro_batches={self.micro_batches} must be 0 (= train.grad_accum) or equal to it")
        if self.heldout_part not in HELDOUT_PARTS:
            raise ValueError(f"heldout_part={self.heldout_part!r} is not one of {', '.join(HELDOUT_PARTS)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must lie in (0, 1)")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size={self.vocab_size} must be > 256 (byte-level BPE)")


class TextTask:
    name = "text"
    next_token_loss = True  # the model may fuse its head into the loss (tasks.base.position_losses)

    def __init__(self, cfg: TextConfig, seed: int, log=print):
        self.cfg, self.seed, self.seq_len = cfg, seed, cfg.seq_len
        cache_dir = cfg.cache_dir or default_cache_dir()
        docs = load_documents(cfg.corpus, "data.text.corpus")
        train_docs, held_docs = split_documents(docs, cfg.heldout_fraction)
        held_docs = heldout_part(held_docs, cfg.heldout_part)
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.vocab_size, train_docs, os.path.join(cache_dir, "tokenizers"))
        arrays = {}
        for split, split_docs in (("train", train_docs), ("heldout", held_docs)):
            key = hashlib.sha256(f"{fingerprint(split_docs)}|{self.tokenizer.fingerprint}|{split}".encode()).hexdigest()
            path = os.path.join(cache_dir, "tokens", f"{key[:24]}-{split}.bin")
            arrays[split] = load_or_build(path, key, [d.text for d in split_docs], self.tokenizer.encode_batch,
                                          self.tokenizer.vocab_size, desc=f"tokenizing {split} documents", log=log)
        self.train, self.heldout = arrays["train"], arrays["heldout"]
        self.heldout_titles = [d.title for d in held_docs]
        if len(self.train.tokens) <= cfg.seq_len + 1:
            raise DataError(f"data.text.corpus: {cfg.corpus!r} gives only {len(self.train.tokens)} training tokens; "
                            f"use more text or a shorter data.text.seq_len")
        self.train_windows = self._document_starts(self.train) if cfg.windows == "document_starts" else None
        if self.train_windows is not None and len(self.train_windows) == 0:
            raise DataError(f"data.corpus: no training document of {cfg.corpus!r} has seq_len+1={cfg.seq_len + 1} "
                            "tokens (data.windows document_starts); use longer documents or a shorter data.seq_len")
        self._order: tuple | None = None  # (seed, epoch, permutation) last used by train_batch
        self.heldout_windows = self._heldout_windows()
        if len(self.heldout_windows) == 0:
            raise DataError(f"data.text.corpus: no held-out document of {cfg.corpus!r} is longer than "
                            f"seq_len+1={cfg.seq_len + 1} tokens; use more text or a shorter data.text.seq_len")

    def _document_starts(self, array) -> np.ndarray:
        """The first token of every document with at least seq_len + 1 tokens, in document order."""
        off = np.asarray(array.doc_offsets, dtype=np.int64)
        return off[:-1][np.diff(off) >= self.seq_len + 1]

    @property
    def epoch_windows(self) -> int | None:
        """Training windows in one epoch (document_starts), or None (random windows have no epoch)."""
        return None if self.train_windows is None else len(self.train_windows)

    def _heldout_windows(self) -> np.ndarray:
        """(start, document) of every non-overlapping window inside a held-out document (document_starts:
        of each held-out document's first window)."""
        if self.cfg.windows == "document_starts":
            off = np.asarray(self.heldout.doc_offsets, dtype=np.int64)
            docs = np.flatnonzero(np.diff(off) >= self.seq_len + 1)
            return np.stack([off[docs], docs], 1).astype(np.int64).reshape(-1, 2)
        return self._windows_inside_documents(self.seq_len)

    def _windows_inside_documents(self, length: int) -> np.ndarray:
        """(start, document) of every non-overlapping ``length``-token window (+1 target) of each held-out
        document, in order."""
        off, span, rows = self.heldout.doc_offsets, length + 1, []
        for d in range(self.heldout.n_docs):
            rows += [(start, d) for start in range(int(off[d]), int(off[d + 1]) - span + 1, span)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    def with_seed(self, seed: int) -> TextTask:
        """The same data (tokenizer, caches, split) with another seed's training order."""
        other = copy.copy(self)
        other.seed = seed
        return other

    def model_overrides(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size, "block_size": self.seq_len,
                "input_dim": None, "output_dim": None}

    def _gather(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        w = torch.from_numpy(tokens[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """document_starts: the order (indices into ``train_windows``) of ``epoch``, fixed by the seed."""
        if self._order is None or self._order[:2] != (self.seed, epoch):
            seq = np.random.SeedSequence([self.seed, _ORDER_STREAM, epoch])
            self._order = (self.seed, epoch, np.random.default_rng(seq).permutation(len(self.train_windows)))
        return self._order[2]

    def _document_start_batch(self, step: int, micro: int, batch_size: int) -> np.ndarray:
        """Positions (step * micro_batches + micro) * batch_size ... of the concatenated epoch orders."""
        m = self.cfg.micro_batches or 1
        if micro >= m:
            raise DataError(f"data.micro_batches={self.cfg.micro_batches} but the loop asked for micro-batch {micro} of a "
                            "step (data.windows document_starts); build the task from "
                            "data.for_grad_accum(train.grad_accum), as the experiments do")
        n = len(self.train_windows)
        pos = (step * m + micro) * batch_size + np.arange(batch_size, dtype=np.int64)
        epochs, index = np.divmod(pos, n)
        starts = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            starts[sel] = self.train_windows[self.epoch_order(int(e))[index[sel]]]
        return starts

    def train_batch(self, step: int, micro: int, batch_size: int):
        if self.train_windows is not None:
            return self._gather(self.train.tokens, self._document_start_batch(step, micro, batch_size))
        gen = batch_generator(self.seed, TRAIN_STREAM, step, micro)
        starts = torch.randint(0, len(self.train.tokens) - self.seq_len - 1, (batch_size,), generator=gen).numpy()
        return self._gather(self.train.tokens, starts)

    def heldout_batch(self, index: int, batch_size: int):
        """A fixed random sample of held-out windows (the same for every call with this index)."""
        gen = batch_generator(self.seed, HELDOUT_STREAM, index)
        rows = torch.randint(0, len(self.heldout_windows), (batch_size,), generator=gen).numpy()
        return self._gather(self.heldout.tokens, self.heldout_windows[rows, 0])

    def windows_of(self, length: int, count: int = 0) -> np.ndarray:
        """(start, document) of ``count`` (0 = all) non-overlapping held-out windows of ``length`` tokens
        (+1 target) inside documents, spread evenly over all such windows: longer or shorter windows
        than ``seq_len`` for an analysis (e.g. 256-token per-position gaps)."""
        rows = self._windows_inside_documents(length)
        if len(rows) == 0:
            raise DataError(f"no held-out document is longer than {length + 1} tokens, so there is no {length}-token "
                            "window to score; use shorter windows or more held-out text")
        if count and count < len(rows):
            rows = rows[np.linspace(0, len(rows) - 1, count).round().astype(np.int64)]
        return rows

    def scored_windows(self, limit: int | None = None) -> np.ndarray:
        """The held-out windows an analysis scores: all of them, or ``limit`` spread evenly over all."""
        rows = self.heldout_windows
        if limit is not None and limit < len(rows):
            rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]
        return rows

    def heldout_all(self, batch_size: int, limit: int | None = None):
        """The scored held-out windows in order: yields ``(x, y, document_ids)``."""
        rows = self.scored_windows(limit)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            x, y = self._gather(self.heldout.tokens, chunk[:, 0])
            yield x, y, torch.from_numpy(chunk[:, 1])

    def loss_per_position(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred.float().transpose(1, 2), y, reduction="none")
