"""Greedy generation from :class:`myopia.GPT`, with or without a key/value cache.

A gradient cut leaves the forward pass unchanged, so myopic models generate exactly like vanilla
ones: the cached path here recomputes each block's forward for the new positions only, reading the
earlier positions' keys and values from the cache. The hook points ``hook_q/k/v`` fire on the new
positions only (their position axis counts the new tokens from 0), so a hook that treats every
position alike (e.g. zeroes a head) acts alike with and without the cache. It is inference only (no gradient) and lives
outside the model, which holds no generation code. Only ``bigram`` (the one cut that changes the
forward) is refused by the cache; ``cache=False`` runs the model's own forward at every step.
"""

from __future__ import annotations

import math

import torch

from myopia.attention import VANILLA, reference_attention
from myopia.attention.reference import causal_additive_mask
from myopia.models.gpt import GPT


class GenerationError(ValueError):
    """A model or request generation cannot serve; the message names the fix."""


def _check(model: GPT, prompt: torch.Tensor, new_tokens: int, cache: bool) -> None:
    cfg = model.config
    if cfg.input_dim is not None or cfg.output_dim is not None:
        raise GenerationError("generate: the model reads or predicts continuous vectors; greedy generation "
                              "needs a token model (input_dim and output_dim None)")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise GenerationError("generate: the prompt must be (batch, length >= 1) token ids, "
                              f"got shape {tuple(prompt.shape)}")
    if new_tokens < 1:
        raise GenerationError(f"generate: new_tokens={new_tokens} must be >= 1")
    if prompt.shape[1] + new_tokens - 1 > cfg.block_size:
        raise GenerationError(f"generate: a prompt of {prompt.shape[1]} tokens plus {new_tokens} new ones needs "
                              f"{prompt.shape[1] + new_tokens - 1} positions but block_size is {cfg.block_size}")
    if cache and any(block.attn.cut.changes_forward for block in model.blocks):
        raise GenerationError(f"generate: the cut {model.config.attention!r} changes the forward pass, which "
                              "the KV cache does not reproduce; use cache=False")


def _attend(attn, x: torch.Tensor, start: int, past: tuple | None):
    """One attention layer for the new positions ``start .. start+T-1``; returns (output, new cache)."""
    B, T, C = x.shape
    q, k, v = attn.split_heads(attn.c_attn(x), offset=start)
    # The model's hook points see (and may patch) the new positions' queries, keys and values only.
    q, k, v = attn.hook_q(q), attn.hook_k(k), attn.hook_v(v)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    y = reference_attention(q, k, v, cut=VANILLA, scale=1.0 / math.sqrt(attn.head_dim),
                            mask=causal_additive_mask(T, q.dtype, x.device, offset=start))
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


@torch.no_grad()
def forward_cached(model: GPT, idx: torch.Tensor, cache: list) -> torch.Tensor:
    """Logits ``(B, T, vocab)`` of the new tokens ``idx`` after the positions already in ``cache``
    (a list, empty at first, that this call extends with each block's keys and values)."""
    start = cache[0][0].shape[2] if cache else 0
    h = model.wte(idx)
    if model.wpe is not None:
        h = h + model.wpe(torch.arange(start, start + idx.shape[1], device=idx.device))
    for i, block in enumerate(model.blocks):
        filled = len(cache) > i
        out, kv = _attend(block.attn, block.ln_1(h), start, cache[i] if filled else None)
        if filled:
            cache[i] = kv
        else:
            cache.append(kv)
        h = h + out
        h = h + block.mlp(block.ln_2(h))
    return model.head(model.ln_f(h))


@torch.no_grad()
def generate_greedy(model: GPT, prompt: torch.Tensor, new_tokens: int, cache: bool = True) -> torch.Tensor:
    """The ``new_tokens`` tokens ``(B, new_tokens)`` greedy decoding appends to ``prompt`` ``(B, P)``
    (argmax at every step; ties go to the lowest id). ``cache=False`` reruns the full forward on the
    growing sequence at every step (the reference the cached path is tested against)."""
    _check(model, prompt, new_tokens, cache)
    was_training = model.training
    model.eval()
    try:
        out = []
        if cache:
            kv: list = []
            logits = forward_cached(model, prompt, kv)[:, -1]
            for step in range(new_tokens):
                token = logits.argmax(-1, keepdim=True)
                out.append(token)
                if step + 1 < new_tokens:
                    logits = forward_cached(model, token, kv)[:, -1]
        else:
            seq = prompt
            for _ in range(new_tokens):
                token = model(seq)[:, -1].argmax(-1, keepdim=True)
                out.append(token)
                seq = torch.cat([seq, token], dim=1)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


__all__ = ["GenerationError", "forward_cached", "generate_greedy"]
