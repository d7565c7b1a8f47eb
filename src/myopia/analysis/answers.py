"""Scoring answer tasks (:mod:`myopia.tasks.answer`): exact match of the whole answer and accuracy per
answer position, from greedy generation starting at the prompt (teacherless tasks: the one forward
pass with dummy answer inputs), with Wilson 95% intervals for one model; optionally also on the
held-out prompts that training never drew (the training stream is regenerated to find them)."""

from __future__ import annotations

import math

import torch

from myopia.models.generate import generate_greedy
from myopia.tasks.answer import prompt_keys


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def predict(model: torch.nn.Module, task, prompt: torch.Tensor, answer: torch.Tensor) -> dict:
    """Predicted answers ``(B, A)`` (greedy generation from the prompt, or for a teacherless task the
    argmax of one forward pass with dummies), and the teacher-forced argmax at each answer position."""
    P, A = task.prompt_len, task.answer_len
    x, _ = task.inputs_targets(prompt, answer)
    was_training = model.training
    model.eval()
    try:
        forced = model(x)[:, P - 1: P - 1 + A].argmax(-1)  # position P-1+j predicts answer token j
    finally:
        model.train(was_training)
    generated = forced if task.teacherless else generate_greedy(model, prompt, A)
    return {"generated": generated, "teacher_forced": forced}


def tally(answers: torch.Tensor, predicted: torch.Tensor) -> dict:
    """Counts of whole-answer matches and of correct tokens per answer position."""
    correct = predicted == answers
    return {"n": int(answers.shape[0]), "exact": int(correct.all(1).sum()),
            "position_correct": correct.sum(0).tolist()}


def summarise(counts: dict) -> dict:
    n = counts["n"]
    out = {"n": n, "exact_match": counts["exact"] / n, "exact_match_ci": list(wilson(counts["exact"], n)),
           "position_accuracy": [c / n for c in counts["position_correct"]],
           "position_accuracy_ci": [list(wilson(c, n)) for c in counts["position_correct"]]}
    return out


def training_prompt_keys(task, steps: int, batch_size: int, grad_accum: int = 1) -> torch.Tensor:
    """Sorted unique :func:`prompt_keys` of every prompt the training loop draws in ``steps`` steps
    (``task.train_batch(step, micro, batch_size)``, as the loop calls it), to tell which held-out
    prompts training also saw. The stream is regenerated from (seed, step), not stored; it assumes the
    run kept one ``batch_size`` and ``grad_accum`` throughout (a resumed run that changed them drew
    other batches)."""
    keys = [prompt_keys(task.train_batch(step, micro, batch_size)[0][:, : task.prompt_len])
            for step in range(steps) for micro in range(grad_accum)]
    return torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.int64)


def _heldout(task, n_samples: int, batch_size: int):
    """The task's first ``n_samples`` held-out ``(prompt, answer)`` examples, in batches of ``batch_size``."""
    done, index = 0, 0
    while done < n_samples:
        prompt, answer = task.heldout_examples(index, batch_size)
        prompt, answer = prompt[: n_samples - done], answer[: n_samples - done]
        yield prompt, answer
        done += prompt.shape[0]
        index += 1


def heldout_prompts(task, n_samples: int, batch_size: int) -> torch.Tensor:
    """The prompts :func:`score` answers with the same ``n_samples`` and ``batch_size`` (to keep them out
    of training: ``task.exclude``)."""
    return torch.cat([prompt for prompt, _ in _heldout(task, n_samples, batch_size)])


def score(model: torch.nn.Module, task, n_samples: int, batch_size: int, device: torch.device,
          seen: torch.Tensor | None = None) -> dict:
    """Greedy scores on the task's first ``n_samples`` held-out examples: ``generated`` (the model's
    own answer) and ``teacher_forced`` (each position given the true answer before it).

    ``seen`` (:func:`training_prompt_keys`): also count the held-out prompts training drew too
    (``seen_in_training``) and score the others alone (``unseen`` in each kind; None when every
    held-out prompt was drawn in training)."""
    answers, prompts, preds = [], [], {"generated": [], "teacher_forced": []}
    for prompt, answer in _heldout(task, n_samples, batch_size):
        prompt, answer = prompt.to(device), answer.to(device)
        for key, pred in predict(model, task, prompt, answer).items():
            preds[key].append(pred)
        answers.append(answer)
        prompts.append(prompt)
    answers_all = torch.cat(answers)
    preds_all = {key: torch.cat(p) for key, p in preds.items()}

    def scored(rows=slice(None)):
        t = {key: tally(answers_all[rows], p[rows]) for key, p in preds_all.items()}
        return {key: {**summarise(c), "counts": c} for key, c in t.items()}

    out: dict = scored()
    if seen is not None:
        new = ~torch.isin(prompt_keys(torch.cat(prompts)), seen.cpu()).to(answers_all.device)
        out["seen_in_training"] = int((~new).sum())
        unseen = scored(new) if new.any() else {}
        for key in preds:
            out[key]["unseen"] = unseen.get(key)
    return out


__all__ = ["heldout_prompts", "predict", "prompt_keys", "score", "summarise", "tally", "training_prompt_keys", "wilson"]
