"""Tasks with answers: a fixed-length prompt, then a fixed-length answer, one token per symbol of a
small fixed vocabulary, generated on the fly from (seed, step) like every task.

The model reads ``prompt + answer[:-1]`` and is trained on the answer tokens only (the loss mask):
the first answer token is predicted at the prompt's last position. Held-out scoring generates the
answer greedily from the prompt (:mod:`myopia.analysis.answers`).

- :class:`MultiplyTask`: the paper's multiplication with filler tokens (Wu et al., appendix): x and y
  reversed and zero-padded to ``x_pad`` / ``y_pad`` digits, ``*``, ``=``, the product reversed and
  zero-padded to ``2 · max_digits`` digits. Padding beyond ``max_digits`` is *filler*: positions to
  compute in before the answer.
- :class:`ParityTask`: n random bits, a marker ``P``, the parity bit.
- :class:`PathStarTask`: Bachmann & Nagarajan (2024)'s path-star graph: a source with ``degree`` arms of
  ``length`` nodes; the prompt is the shuffled edge list, the source and the goal (the end of one arm);
  the answer is that arm's nodes from the one after the source to the goal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from myopia.config import ConfigError
from myopia.tasks.base import HELDOUT_STREAM, IGNORE, TRAIN_STREAM, batch_generator

PATH_STAR_MODES = ("standard", "reverse", "teacherless")
_PRIME = 2_147_483_629  # below 2**31: a hash times a base below 2**31 stays inside int64
_BASES = (1_000_003, 998_244_353)
_MAX_REDRAWS = 1000


def prompt_keys(prompt: torch.Tensor) -> torch.Tensor:
    """One int64 key (on the CPU) per prompt row ``(B, P)``: equal prompts share a key; distinct ones
    practically never do (two polynomial hashes modulo a prime near 2**31, side by side)."""
    halves = []
    for base in _BASES:
        h = torch.zeros(prompt.shape[0], dtype=torch.int64)
        for column in prompt.detach().cpu().long().T:
            h = (h * base + column + 1) % _PRIME
        halves.append(h)
    return halves[0] * (1 << 31) + halves[1]


class AnswerTask:
    """Base of the answer tasks: subclasses set ``vocab``, ``prompt_len``, ``answer_len`` and ``sample``."""

    name = "answer"
    next_token_loss = True  # the model may fuse its head into the loss (tasks.base.position_losses)
    vocab: list[str]
    prompt_len: int
    answer_len: int
    teacherless = False
    """Answer-side inputs replaced by the dummy token (``vocab[-1]``); scored by one forward pass."""

    def __init__(self, seed: int):
        self.seed = seed
        self.excluded: torch.Tensor | None = None
        """Sorted :func:`prompt_keys` of the prompts training never draws (:meth:`exclude`)."""
        if self.answer_len < 1:
            raise ValueError(f"{self.name}: the answer is empty (answer_len={self.answer_len}); "
                             "choose settings that leave at least one answer token")

    @property
    def seq_len(self) -> int:
        """Model input length: the prompt, then every answer token but the last."""
        return self.prompt_len + self.answer_len - 1

    def model_overrides(self) -> dict:
        return {"vocab_size": len(self.vocab)}

    def sample(self, gen: torch.Generator, batch_size: int, heldout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt (B, prompt_len), answer (B, answer_len))`` token ids; ``heldout`` draws from the
        held-out distribution where a task has its own (multiply's ``eval_min_digits``)."""
        raise NotImplementedError

    def encode(self, text: list[str]) -> list[int]:
        return [self.vocab.index(s) for s in text]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def inputs_targets(self, prompt: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs ``(B, seq_len)`` and targets with IGNORE on every prompt position but the last."""
        seq = torch.cat([prompt, answer], dim=1)
        x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
        y[:, : self.prompt_len - 1] = IGNORE
        if self.teacherless:
            x[:, self.prompt_len:] = len(self.vocab) - 1
        return x, y

    def exclude(self, prompts: torch.Tensor) -> None:
        """Keep these prompts ``(N, prompt_len)`` out of training: a training draw equal to one of them is
        replaced by the next draw from the same (seed, step) stream, so the stream stays reproducible
        and every other row is the one drawn without exclusion."""
        self.excluded = torch.unique(prompt_keys(prompts))

    def train_batch(self, step: int, micro: int, batch_size: int):
        gen = batch_generator(self.seed, TRAIN_STREAM, step, micro)
        prompt, answer = self.sample(gen, batch_size)
        if self.excluded is not None:
            prompt, answer = self._redraw_excluded(gen, prompt, answer)
        return self.inputs_targets(prompt, answer)

    def _redraw_excluded(self, gen: torch.Generator, prompt: torch.Tensor, answer: torch.Tensor):
        for _ in range(_MAX_REDRAWS):
            hit = torch.isin(prompt_keys(prompt), self.excluded).nonzero().squeeze(1)
            if hit.numel() == 0:
                return prompt, answer
            prompt, answer = prompt.clone(), answer.clone()
            prompt[hit], answer[hit] = self.sample(gen, hit.numel())
        raise ConfigError(f"{self.name}: the held-out prompts are (nearly) all the prompts training can draw "
                          f"({_MAX_REDRAWS} redraws found no other); lower --eval_samples or --train.eval_batches, "
                          "widen the task, or turn --exclude_heldout off")

    def heldout_batch(self, index: int, batch_size: int):
        return self.inputs_targets(*self.heldout_examples(index, batch_size))

    def heldout_examples(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts and answers behind ``heldout_batch(index, batch_size)``."""
        return self.sample(batch_generator(self.seed, HELDOUT_STREAM, index), batch_size, heldout=True)

    def loss_per_position(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred.float().transpose(1, 2), y, ignore_index=IGNORE, reduction="none")

    def loss_mask(self, y: torch.Tensor) -> torch.Tensor:
        return y != IGNORE


def _digits(values: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` decimal digits of ``values``, least significant first (the reversed, zero-padded number)."""
    powers = 10 ** torch.arange(n, dtype=torch.int64)
    return (values[:, None] // powers) % 10


@dataclass
class MultiplyConfig:
    """Multiplication with filler tokens (the paper's format)."""

    min_digits: int = 1
    """Fewest digits of each operand (a digit count is drawn uniformly in [min_digits, max_digits])."""
    max_digits: int = 3
    """Most digits of each operand; the product is written with 2 · max_digits digits."""
    x_pad: int = 0
    """x is written reversed and zero-padded to this many digits (filler = x_pad − max_digits;
    0 = max_digits, no filler)."""
    y_pad: int = 0
    """y is written reversed and zero-padded to this many digits (0 = max_digits)."""
    eval_min_digits: int = 0
    """Fewest digits of each held-out operand (0 = min_digits). The paper trains on 1-5 digits and
    scores 5×5-digit products: min_digits 1, max_digits 5, eval_min_digits 5."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"min_digits={self.min_digits}, max_digits={self.max_digits}: need 1 <= min_digits "
                             "<= max_digits; set --multiply.min_digits / --multiply.max_digits accordingly")
        if self.x_pad < 0 or self.y_pad < 0:
            raise ValueError(f"x_pad={self.x_pad}, y_pad={self.y_pad}: pads are >= 0 (0 = max_digits, no filler)")
        if self.eval_min_digits and not self.min_digits <= self.eval_min_digits <= self.max_digits:
            raise ValueError(f"eval_min_digits={self.eval_min_digits} is outside [min_digits, max_digits] = "
                             f"[{self.min_digits}, {self.max_digits}]; set --multiply.eval_min_digits in that range "
                             "(0 = min_digits)")
        if self.max_digits > 9:
            raise ValueError(f"max_digits={self.max_digits}: products above 18 digits overflow int64; use at most 9")
        for name in ("x_pad", "y_pad"):
            if getattr(self, name) and getattr(self, name) < self.max_digits:
                raise ValueError(f"{name}={getattr(self, name)} does not fit max_digits={self.max_digits} digits; "
                                 f"set --multiply.{name} {self.max_digits} or more (or lower --multiply.max_digits)")


class MultiplyTask(AnswerTask):
    """``x₀ x₁ … * y₀ y₁ … = p₀ p₁ …``: digits least significant first, zero-padded."""

    name = "multiply"
    vocab = [str(d) for d in range(10)] + ["*", "="]
    STAR, EQUALS = 10, 11

    def __init__(self, cfg: MultiplyConfig, seed: int):
        self.cfg = cfg
        self.x_pad, self.y_pad = cfg.x_pad or cfg.max_digits, cfg.y_pad or cfg.max_digits
        self.prompt_len = self.x_pad + self.y_pad + 2
        self.answer_len = 2 * cfg.max_digits
        super().__init__(seed)

    def _operand(self, gen: torch.Generator, batch_size: int, heldout: bool = False) -> torch.Tensor:
        c = self.cfg
        least = (c.eval_min_digits or c.min_digits) if heldout else c.min_digits
        k = torch.randint(least, c.max_digits + 1, (batch_size,), generator=gen)
        lo = torch.where(k == 1, 0, 10 ** (k - 1))
        hi = 10**k  # exclusive
        u = torch.rand(batch_size, generator=gen, dtype=torch.float64)
        return lo + (u * (hi - lo).double()).long().clamp(max=(hi - lo - 1)).clamp(min=0)

    def operands(self, gen: torch.Generator, batch_size: int, heldout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self._operand(gen, batch_size, heldout), self._operand(gen, batch_size, heldout)

    def sample(self, gen: torch.Generator, batch_size: int, heldout: bool = False):
        x, y = self.operands(gen, batch_size, heldout)
        B = batch_size
        prompt = torch.cat([_digits(x, self.x_pad), torch.full((B, 1), self.STAR),
                            _digits(y, self.y_pad), torch.full((B, 1), self.EQUALS)], dim=1)
        return prompt, _digits(x * y, self.answer_len)


@dataclass
class ParityConfig:
    """Parity of random bits (the paper's repository: 30 bits, a marker, the parity bit)."""

    bits: int = 30
    """Number of random bits."""

    def __post_init__(self) -> None:
        if self.bits < 1:
            raise ValueError(f"bits={self.bits}: need at least one bit; set --parity.bits 1 or more")


class ParityTask(AnswerTask):
    """``b₁ … bₙ P p`` with p = b₁ xor … xor bₙ; the loss is on p only."""

    name = "parity"
    vocab = ["0", "1", "P"]
    MARKER = 2

    def __init__(self, cfg: ParityConfig, seed: int):
        self.cfg = cfg
        self.prompt_len, self.answer_len = cfg.bits + 1, 1
        super().__init__(seed)

    def sample(self, gen: torch.Generator, batch_size: int, heldout: bool = False):
        bits = torch.randint(0, 2, (batch_size, self.cfg.bits), generator=gen)
        prompt = torch.cat([bits, torch.full((batch_size, 1), self.MARKER)], dim=1)
        return prompt, bits.sum(1, keepdim=True) % 2


@dataclass
class PathStarConfig:
    """Path-star graphs (Bachmann & Nagarajan 2024, "The Pitfalls of Next-Token Prediction")."""

    degree: int = 2
    """Arms leaving the source (d)."""
    length: int = 5
    """Nodes on each arm after the source (l); the answer is one arm's l nodes."""
    nodes: int = 50
    """Node labels to draw from (N); a graph uses 1 + d·l distinct ones."""
    mode: str = "standard"
    """standard (the path source→goal) | reverse (the path written from the goal back) | teacherless
    (answer-side inputs replaced by a dummy token; scored by one forward pass)."""

    def __post_init__(self) -> None:
        if self.degree < 1:
            raise ValueError(f"degree={self.degree}: need at least one arm; set --path_star.degree 1 or more")
        if self.length < 1:
            raise ValueError(f"length={self.length}: the answer is empty; set --path_star.length 1 or more")
        if 1 + self.degree * self.length > self.nodes:
            raise ValueError(f"nodes={self.nodes} labels cannot draw a graph of 1 + degree·length = "
                             f"{1 + self.degree * self.length} distinct nodes; set --path_star.nodes "
                             f"{1 + self.degree * self.length} or more (or shorten --path_star.length)")
        if self.mode not in PATH_STAR_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(PATH_STAR_MODES)}")


class PathStarTask(AnswerTask):
    """``u v | u v | … | s g =`` then the arm ``a₁ … a_l`` (reversed in ``reverse`` mode)."""

    name = "path-star"

    def __init__(self, cfg: PathStarConfig, seed: int):
        self.cfg = cfg
        n = cfg.nodes
        self.vocab = [f"n{i}" for i in range(n)] + ["|", "=", "_"]
        self.SEP, self.EQUALS, self.DUMMY = n, n + 1, n + 2
        self.prompt_len = 3 * cfg.degree * cfg.length + 3
        self.answer_len = cfg.length
        self.teacherless = cfg.mode == "teacherless"
        super().__init__(seed)

    def sample(self, gen: torch.Generator, batch_size: int, heldout: bool = False):
        c, B = self.cfg, batch_size
        labels = torch.argsort(torch.rand(B, c.nodes, generator=gen), dim=1)[:, : 1 + c.degree * c.length]
        source, arms = labels[:, :1], labels[:, 1:].reshape(B, c.degree, c.length)
        parents = torch.cat([source[:, :, None].expand(B, c.degree, 1), arms[:, :, :-1]], dim=2)
        edges = torch.stack([parents, arms], dim=-1).reshape(B, c.degree * c.length, 2)
        order = torch.argsort(torch.rand(B, c.degree * c.length, generator=gen), dim=1)
        edges = torch.gather(edges, 1, order[:, :, None].expand(-1, -1, 2))
        edges = torch.cat([edges, torch.full((B, edges.shape[1], 1), self.SEP)], dim=2).reshape(B, -1)
        goal_arm = torch.randint(0, c.degree, (B,), generator=gen)
        answer = arms[torch.arange(B), goal_arm]
        prompt = torch.cat([edges, source, answer[:, -1:], torch.full((B, 1), self.EQUALS)], dim=1)
        if c.mode == "reverse":
            answer = answer.flip(1)
        return prompt, answer


__all__ = ["AnswerTask", "MultiplyConfig", "MultiplyTask", "PATH_STAR_MODES", "ParityConfig", "ParityTask",
           "PathStarConfig", "PathStarTask", "prompt_keys"]
