"""``myopia.GPT``: a GPT-2-style pre-LayerNorm decoder whose attention mode is a config field.

The model holds no training, logging or parallelism code. Token input gives logits over the
vocabulary; with ``input_dim``/``output_dim`` set it reads and predicts continuous vectors (the
synthetic regression task). Each block's ``attn`` is called with the block's normalised hidden states
as its first argument, and exposes hook points ``hook_q``, ``hook_k``, ``hook_v`` (identity modules
holding the post-rotary queries, keys and values) for analyses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from myopia.attention import ATTENTION_MODES, BACKENDS, VANILLA, Cut, attention, reference_attention
from myopia.attention.cut import check_backend
from myopia.attention.projection import project_with_weight_only_copy
from myopia.models.token_loss import linear_cross_entropy


INIT_SCHEMES = ("gpt2", "torch-default")
IO_INIT_SCHEMES = ("body", "torch-default")


@dataclass
class GPTConfig:
    """Shape and behaviour of a :class:`GPT`."""

    vocab_size: int = 8192
    """Vocabulary size (ignored when ``input_dim`` is set)."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Number of attention (query) heads."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 64
    """Longest sequence the model accepts (size of the learned position table)."""
    attention: str = "vanilla"
    """Gradient cut: vanilla | myopic | myopic_kv | bigram, with @BETA, :h=W (horizon), :layers=A-B
    (e.g. myopic@0.5, myopic:h=8, myopic:layers=0); see myopia.attention.cut."""
    dropout: float = 0.0
    """Dropout on embeddings and residual branches (attention probabilities are never dropped)."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention (None = n_head)."""
    position: str = "learned"
    """Position encoding: learned (GPT-2 table) | rotary."""
    rotary_base: float = 10000.0
    """Rotary base frequency (position = rotary)."""
    activation: str = "gelu"
    """MLP non-linearity: gelu | relu."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of n_embd."""
    bias: bool = True
    """Biases in linear layers and LayerNorms."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head (token models only)."""
    input_dim: int | None = None
    """Continuous input: size of each input vector (None = token ids)."""
    output_dim: int | None = None
    """Continuous output: size of each predicted vector (None = vocabulary logits)."""
    backend: str = "auto"
    """Attention backend: auto | fused (O(n) memory) | reference (eager n×n)."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    init: str = "gpt2"
    """Weight initialisation: gpt2 (every Linear and embedding N(0, init_std), zero biases, residual
    projections N(0, init_std/sqrt(2·n_layer))) | torch-default (Linear layers keep PyTorch's default:
    kaiming-uniform weights and uniform biases, bound 1/sqrt(fan_in); embedding tables N(0, init_std))."""
    io_init: str = "body"
    """Continuous input/output Linear layers (input_dim/output_dim): body (initialised as init says) |
    torch-default (PyTorch's default, as in the paper's synthetic model, whose Linear(2→d) and
    Linear(d→1) are attached to GPT-2 after its std-0.02 initialisation)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        self.attention = str(Cut.parse(self.attention).check_layers(self.n_layer, f"GPT with n_layer={self.n_layer}"))
        check_backend(self.backend)
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"GPTConfig.n_head={self.n_head} is not divisible by n_kv_head={kv}")
        if self.position not in ("learned", "rotary"):
            raise ValueError(f"GPTConfig.position={self.position!r} is not one of learned, rotary")
        if self.position == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError("GPTConfig.position='rotary' needs an even head dimension")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"GPTConfig.activation={self.activation!r} is not one of gelu, relu")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout} is outside [0, 1)")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"GPTConfig.init={self.init!r} is not one of {', '.join(INIT_SCHEMES)}")
        if self.io_init not in IO_INIT_SCHEMES:
            raise ValueError(f"GPTConfig.io_init={self.io_init!r} is not one of {', '.join(IO_INIT_SCHEMES)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def cut(self) -> Cut:
        return Cut.parse(self.attention)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        data = dict(data)
        beta = data.pop("beta", 0.0)  # checkpoints before the cut spec kept beta apart
        if beta:
            data["attention"] = str(Cut.parse(f"{data.get('attention', 'vanilla')}@{beta}"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GPTConfig has no field {unknown[0]!r}")
        return cls(**data)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) over the whole head dimension."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``t`` (``(..., T, head_dim)``) as positions ``offset .. offset+T-1``."""
        T = t.shape[-2]
        cos, sin = self.cos[offset:offset + T].to(t.dtype), self.sin[offset:offset + T].to(t.dtype)
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = (
            Rotary(self.head_dim, config.block_size, config.rotary_base)
            if config.position == "rotary"
            else None
        )
        self.hook_q, self.hook_k, self.hook_v = nn.Identity(), nn.Identity(), nn.Identity()
        self.cut: Cut = VANILLA  # this block's cut; GPT sets it per layer
        self.backend = config.backend

    def split_heads(self, qkv: torch.Tensor, offset: int = 0):
        """Heads ``(B, H, T, head_dim)`` of the projected ``qkv``, rotated as positions from ``offset``."""
        B, T, _ = qkv.shape
        sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        q, k, v = qkv.split(sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the normalised attention input. ``past`` (local myopia): normalised states of
        another (frozen) model that positions read as their past, through this layer's live key and
        value weights; each position's own key and value still come from ``x``."""
        B, T, C = x.shape
        if past is not None:
            return self._forward_external_past(x, past.detach())
        k_past = v_past = None
        cut = self.cut.at_length(T)
        if cut.needs_past_kv and torch.is_grad_enabled():
            qkv, qkv_weight_only = project_with_weight_only_copy(x, self.c_attn.weight, self.c_attn.bias)
            _, k_past, v_past = self.split_heads(qkv_weight_only)
        else:
            qkv = self.c_attn(x)
            if cut.needs_past_kv:
                cut = VANILLA  # no gradient: the forward value is the ordinary one
        q, k, v = self.split_heads(qkv)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        y = attention(q, k, v, cut=cut, k_past=k_past, v_past=v_past, backend=self.backend)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


    def _forward_external_past(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        # The forward differs from causal attention over x (the past keys/values have other values),
        # so only the eager reference computes it; windows here are short (the paper's are 64).
        B, T, C = x.shape
        q, k, v = self.split_heads(self.c_attn(x))
        _, k_past, v_past = self.split_heads(self.c_attn(past))
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        y = reference_attention(q, k, v, cut="myopic", scale=1.0 / math.sqrt(self.head_dim),
                                mask=None, k_past=k_past, v_past=v_past)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = nn.GELU(approximate="tanh") if config.activation == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        # A past from another model goes through *this* layer's pre-attention norm, as the present
        # does (the paper's code projected it un-normalised).
        x = x + self.attn(self.ln_1(x), None if past is None else self.ln_1(past))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer; ``model(x)`` returns ``(B, T, vocab_size | output_dim)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if config.input_dim is None:
            self.wte: nn.Module = nn.Embedding(config.vocab_size, config.n_embd)
        else:
            self.wte = nn.Linear(config.input_dim, config.n_embd, bias=config.bias)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        if config.output_dim is None:
            self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        else:
            self.head = nn.Linear(config.n_embd, config.output_dim, bias=True)
        self._initialise()
        if config.tie_embeddings and config.input_dim is None and config.output_dim is None:
            self.head.weight = self.wte.weight
        self.set_attention(config.attention)

    def _initialise(self) -> None:
        """``config.init`` and ``config.io_init`` (modules hold PyTorch's default init when this runs)."""
        config = self.config
        continuous = [m for m, dim in ((self.wte, config.input_dim), (self.head, config.output_dim)) if dim is not None]
        if config.io_init != "body" and not continuous:
            raise ValueError(f"GPTConfig.io_init={config.io_init!r} needs a continuous input or output layer "
                             "(input_dim/output_dim); a token model has none: leave io_init='body'")
        if config.init == "gpt2":
            self.apply(self._init_weights)
            residual_std = config.init_std / math.sqrt(2 * config.n_layer)
            for block in self.blocks:
                nn.init.normal_(block.attn.c_proj.weight, std=residual_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=residual_std)
            if config.io_init == "torch-default":
                for module in continuous:
                    module.reset_parameters()
        else:  # torch-default: only the embedding tables leave PyTorch's default (N(0, 1) there)
            for module in (self.wte, self.wpe):
                if isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, mean=0.0, std=config.init_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_attention(self, cut: Cut | str | None = None, backend: str | None = None) -> GPT:
        """Switch the model to another gradient cut (a :class:`Cut` or its text, e.g. ``myopic:h=8``)
        and/or backend in place; every block gets ``cut.for_layer(i)`` and the config follows."""
        cut = self.config.cut if cut is None else Cut.parse(cut)
        cut.check_layers(len(self.blocks), f"GPT with n_layer={len(self.blocks)}")
        backend = self.config.backend if backend is None else backend
        check_backend(backend)
        self.config.attention, self.config.backend = str(cut), backend  # the config's text follows
        self._cut = cut
        for i, block in enumerate(self.blocks):
            block.attn.cut, block.attn.backend = cut.for_layer(i), backend
        return self

    def attention_cut(self) -> Cut:
        """The cut ``set_attention`` last set."""
        return self._cut

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        return_hidden_states: bool = False,
        past_states: list[torch.Tensor] | None = None,
    ):
        """``x``: token ids ``(B, T)`` or, with ``input_dim``, vectors ``(B, T, input_dim)``.

        With ``targets`` (token ids ``(B, T)``; -100 = no loss) a token model returns the
        next-token cross-entropy at every position, ``(B, T)`` float32, instead of the logits:
        the head and the loss run in row chunks (:func:`myopia.models.token_loss.linear_cross_entropy`),
        so the ``(B, T, vocab_size)`` logits never exist at once.

        With ``return_hidden_states`` also returns the residual stream before block 0 (the
        embeddings) and after every block: ``n_layer + 1`` tensors of shape ``(B, T, n_embd)``.

        ``past_states`` (local myopia): the residual streams entering each block of another model
        (the first ``n_layer`` of its ``return_hidden_states``); at block ``l`` every position reads
        ``past_states[l]`` at earlier positions instead of this model's own states. Equal weights
        give exactly the other model's outputs.
        """
        if targets is not None and self.config.output_dim is not None:
            raise ValueError("GPT(targets=...) computes a next-token cross-entropy; this model has a continuous "
                             f"output (output_dim={self.config.output_dim}): call model(x) and score its output")
        hidden = self._streams(x, past_states)
        h = hidden[-1]
        if targets is None:
            out = self.head(self.ln_f(h))
        else:
            out = linear_cross_entropy(self.ln_f(h), self.head.weight, targets)
        return (out, hidden) if return_hidden_states else out

    def _streams(self, x: torch.Tensor, past_states: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The residual stream before block 0 (the embeddings) and after every block."""
        if past_states is not None and len(past_states) < self.config.n_layer:
            raise ValueError(f"past_states has {len(past_states)} tensors; the model has {self.config.n_layer} blocks")
        T = x.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        h = self.wte(x)
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(T, device=h.device))
        h = self.drop(h)
        hidden = [h]
        for i, block in enumerate(self.blocks):
            h = block(h, None if past_states is None else past_states[i])
            hidden.append(h)
        return hidden

    def residual_streams(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(streams, final)``: the residual streams (embeddings, then after every block) and the final
        normalised state the output head reads, without computing the head."""
        hidden = self._streams(x)
        return hidden, self.ln_f(hidden[-1])

    def output_head(self) -> nn.Linear:
        """The output head (for a token model, the unembedding)."""
        return self.head


__all__ = ["ATTENTION_MODES", "BACKENDS", "GPT", "GPTConfig"]
