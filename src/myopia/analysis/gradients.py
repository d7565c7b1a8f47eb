"""The vanilla gradient, split into the part myopic training keeps and the part it drops.

At fixed weights, ``g_total`` (vanilla mode) = ``g_myopic`` (the diagonal terms: each position's
loss through its own position's states) + ``g_future`` (the off-diagonal terms: later positions'
losses through earlier positions' states, the only signal that can train pre-caching). The forward
values of both modes are equal, so one model switched between them gives both gradients of the same
loss on the same held-out batches, and ``g_future = g_total - g_myopic`` exactly.

Measured over training, this is the gradient geometry of the paper's repository (``grad_angle``,
Pythia-410m checkpoints: cos(myopic, future) about +0.04 at initialisation, -0.48 near step 256,
+0.1 after 10k steps). As there, embedding parameters (token and position embeddings, and the output
head) are left out: the head's gradient is the same in both modes, and the token embedding's is
dominated by its sparse rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from myopia.tasks.base import model_loss
from myopia.train.loop import autocast_for

# What the paper's repository measured (our notes, §4.3), for the reports.
PAPER_GEOMETRY = {"model": "Pythia-410m-deduped checkpoints, 1,000 Pile rows",
                  "cos_at_init": 0.04, "cos_min": -0.48, "cos_min_step": 256, "cos_late": 0.1}


def splittable(model: nn.Module) -> bool:
    """Whether ``model`` can be switched between attention modes in place (myopia's GPT, a Hugging
    Face model behind ``HFCausalLM``); the local-myopic wrapper cannot."""
    return callable(getattr(model, "set_attention", None)) and callable(getattr(model, "attention_cut", None))


def body_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters other than the embeddings and the output head."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "head", None)
    if head is None and hasattr(model, "hf"):
        head = model.hf.get_output_embeddings()
    if isinstance(head, nn.Module):
        skip |= {id(p) for p in head.parameters()}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]


def _layer(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _gradients(model: nn.Module, params: list[nn.Parameter], batches: list, device: torch.device,
               precision: str, task) -> list[torch.Tensor]:
    """The mean training loss's gradient over ``batches`` (the task's own loss: a next-token task's
    head fused into it), accumulated into the first batch's gradients: at most two gradient-sized
    lists exist at once (the model's own .grad is not touched)."""
    total = None
    for x, y in batches:
        with autocast_for(device, precision):
            loss = model_loss(task, model, x.to(device), y.to(device)) / len(batches)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if total is None:
            total = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) if g is None else
                     g.to(torch.promote_types(p.dtype, torch.float32)) for p, g in zip(params, grads)]
            continue
        for acc, g in zip(total, grads):
            if g is not None:
                acc += g.to(acc.dtype)
    return total


def _consume_gradients(model: nn.Module, named: list[tuple[str, nn.Parameter]], reference: list[torch.Tensor],
                       batches: list, device: torch.device, precision: str, task,
                       use: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """The mean loss's gradient over ``batches`` like :func:`_gradients`, but handed parameter by
    parameter to ``use(name, reference gradient, this gradient)`` as the last batch's backward pass
    produces it, and then dropped: with ``reference`` alive, at most one more gradient-sized list exists
    (SmolLM2-135M: 0.5 GB less than two whole lists). The model's own ``.grad`` is set aside and put back."""
    params = [p for _, p in named]
    kept = [p.grad for p in params]
    seen: set[int] = set()
    hooks = []
    try:
        for p in params:
            p.grad = None
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1
            if last:
                for k, (name, p) in enumerate(named):
                    def hook(q: torch.Tensor, k: int = k, name: str = name) -> None:
                        seen.add(k)
                        use(name, reference[k], q.grad.to(reference[k].dtype))
                        q.grad = None
                    hooks.append(p.register_post_accumulate_grad_hook(hook))
            with autocast_for(device, precision):
                loss = model_loss(task, model, x.to(device), y.to(device)) / len(batches)
            torch.autograd.backward(loss, inputs=params)
        for k, (name, p) in enumerate(named):  # parameters the loss does not reach: a zero gradient
            if k not in seen:
                use(name, reference[k], torch.zeros_like(reference[k]) if p.grad is None else p.grad.to(reference[k].dtype))
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(params, kept):
            p.grad = g


def _summary(total: float, myopic: float, future: float, dot: float) -> dict:
    return {"total_norm": math.sqrt(total), "myopic_norm": math.sqrt(myopic), "future_norm": math.sqrt(future),
            "cos_myopic_future": dot / math.sqrt(myopic * future) if myopic > 0 and future > 0 else 0.0,
            "future_share": future / total if total > 0 else 0.0}


def _parameter_groups(named: list[tuple[str, nn.Parameter]], groups: int) -> list[list[tuple[str, nn.Parameter]]]:
    """``named`` cut into at most ``groups`` consecutive runs of about equal size (in elements)."""
    total = sum(p.numel() for _, p in named)
    out: list[list[tuple[str, nn.Parameter]]] = [[]]
    seen = 0
    for item in named:
        if out[-1] and len(out) < groups and seen >= total * len(out) / groups:
            out.append([])
        out[-1].append(item)
        seen += item[1].numel()
    return out


def gradient_split(model: nn.Module, task, n_batches: int, batch_size: int, device: torch.device,
                   precision: str = "auto", groups: int = 1) -> dict:
    """Norms of ``g_total``, ``g_myopic`` and ``g_future`` over the body parameters, the cosine
    between ``g_myopic`` and ``g_future``, and ``future_share`` = ‖g_future‖² / ‖g_total‖²; the same
    per layer under ``layers``. Uses ``task``'s first ``n_batches`` held-out batches, the model in
    eval mode (no dropout); ``.grad`` is set aside and restored, every RNG left untouched, and the
    model's attention mode restored afterwards. The myopic gradient is consumed parameter by
    parameter as it is produced, so at most two gradient-sized lists exist at once counting ``.grad``.

    ``groups`` > 1 measures the body's parameters in that many consecutive groups (by layer), two
    passes per group with the other groups frozen: the reference gradient held during the myopic
    pass is one group's, not the whole body's (SmolLM2-135M, 2 groups: about 0.2 GB less at the peak
    for about 1.5 times the time, as the later group's backward stops where the group starts). The
    result is the same up to the order of the float64 sums."""
    if groups < 1:
        raise ValueError(f"groups={groups} must be >= 1")
    if not splittable(model):
        raise TypeError(f"{type(model).__name__} cannot switch attention modes; gradient_split needs "
                        "set_attention and attention_cut (myopia.GPT or HFCausalLM)")
    named = body_parameters(model)
    batches = [task.heldout_batch(i, batch_size) for i in range(n_batches)]
    cut = model.attention_cut()
    was_training = model.training
    model.eval()
    sums: dict[int | None, list[float]] = {}

    def add(name: str, t: torch.Tensor, m: torch.Tensor) -> None:
        t, m = t.double(), m.double()
        f = t - m
        parts = [float(t.square().sum()), float(m.square().sum()), float(f.square().sum()), float((m * f).sum())]
        for key in {None, _layer(name)}:  # the whole body, and the layer (if any)
            acc = sums.setdefault(key, [0.0] * 4)
            for i, v in enumerate(parts):
                acc[i] += v

    # The embeddings and the head are not measured: with their requires_grad off for the passes no
    # gradient (and no buffer) is made for them (SmolLM2-135M's 49,152 x 576 head: 0.3 GB less at the peak).
    # Likewise the groups other than the one measured: their layers save nothing for the backward pass
    # beyond what the gradient through them to the measured group needs.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for group in _parameter_groups(named, groups):
            measured = {id(p) for _, p in group}
            for p in trainable:
                p.requires_grad_(id(p) in measured)
            model.set_attention("vanilla")
            g_total = _gradients(model, [p for _, p in group], batches, device, precision, task)
            model.set_attention("myopic")
            _consume_gradients(model, group, g_total, batches, device, precision, task, add)
            del g_total
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.set_attention(cut)
        model.train(was_training)
    out = _summary(*sums.pop(None))
    out["layers"] = {str(k): _summary(*v) for k, v in sorted(sums.items())}
    out["batches"] = n_batches
    return out


def log_spaced_steps(step: int, every: int) -> bool:
    """0, 1, 2, 4, 8, ... and every ``every``-th step (0 = powers of two only)."""
    return step == 0 or (step & (step - 1)) == 0 or (every > 0 and step % every == 0)


def split_monitor(task, n_batches: int, batch_size: int, precision: str, every: int,
                  final_step: int, groups: int = 1) -> Callable[[nn.Module, int], dict | None]:
    """A training-loop monitor measuring :func:`gradient_split` at 0, 1, 2, 4, ..., every ``every``
    steps and at ``final_step``, on the model's device; ``train_arm`` writes its records to the arm's
    ``metrics.jsonl`` under ``gradient_split``."""

    def monitor(model: nn.Module, step: int, optimizer=None) -> dict | None:
        if not (log_spaced_steps(step, every) or step == final_step):
            return None
        device = next(model.parameters()).device
        return {"gradient_split": gradient_split(model, task, n_batches, batch_size, device, precision, groups)}

    return monitor


__all__ = ["PAPER_GEOMETRY", "body_parameters", "gradient_split", "log_spaced_steps", "splittable", "split_monitor"]
