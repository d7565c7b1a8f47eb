"""Scoring answer tasks (:mod:`myopia.tasks.answer`): exact match of the whole answer and accuracy per
answer position, from greedy generation starting at the prompt (teacherless tasks: the one forward
pass with dummy answer inputs), with Wilson 95% intervals for one model."""

from __future__ import annotations

import math

import torch

from myopia.generation import generate_greedy


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


def score(model: torch.nn.Module, task, n_samples: int, batch_size: int, device: torch.device) -> dict:
    """Greedy scores on the task's first ``n_samples`` held-out examples: ``generated`` (the model's
    own answer) and ``teacher_forced`` (each position given the true answer before it)."""
    answers, preds = [], {"generated": [], "teacher_forced": []}
    done, index = 0, 0
    while done < n_samples:
        prompt, answer = task.heldout_examples(index, batch_size)
        prompt, answer = prompt[: n_samples - done].to(device), answer[: n_samples - done].to(device)
        for key, pred in predict(model, task, prompt, answer).items():
            preds[key].append(pred)
        answers.append(answer)
        done += prompt.shape[0]
        index += 1
    totals = {key: tally(torch.cat(answers), torch.cat(p)) for key, p in preds.items()}
    return {key: {**summarise(t), "counts": t} for key, t in totals.items()}


__all__ = ["predict", "score", "summarise", "tally", "wilson"]
