"""``myopia answer``: tasks with answers (multiplication with filler, parity, path-star graphs).

For every seed and condition (a pad of the multiplication task, a path-star mode, or parity's one
setting) every arm is trained from the same initial weights on the same batches, with the loss on
the answer tokens only; then each model answers fresh held-out prompts by greedy generation (a
teacherless path-star model: one forward pass with dummy answer inputs). Scores: exact match of the
whole answer and accuracy per answer position, with Wilson intervals for one model and t-intervals
over seeds. For multiplication the **filler gain** is the exact match at the largest pad minus that
at the smallest, per arm and seed (the paper: vanilla +0.63, myopic −0.32 from pad 5 to pad 10).
Writes ``results.json``, ``report.md`` and plots.
"""

from __future__ import annotations

import json
import os

import torch

from myopia.analysis.answers import heldout_prompts, score, training_prompt_keys
from myopia.analysis.stats import mean_ci
from myopia.config import ConfigError
from myopia.experiments.answer import report
from myopia.experiments.answer.config import PAPER, AnswerExperiment, conditions
from myopia.runs.grid import Cell, paired_runs, runs_by_arm, train_grid
from myopia.runs.pairs import Pair, parse_pairs
from myopia.runs.results import Results, Status, publish, recording
from myopia.tasks.answer import AnswerTask
from myopia.train.checkpoint import atomic_write_text
from myopia.train.config import TrainConfig
from myopia.train.loop import resolve_device


def run(cfg: AnswerExperiment) -> dict:
    conds = conditions(cfg)
    arms = conds[0].arms
    pairs = parse_pairs(cfg.pairs, [a.name for a in arms], "pairs")
    device = resolve_device(cfg.train.device)
    os.makedirs(cfg.out, exist_ok=True)
    print(f"myopia answer: {cfg.task}, {len(cfg.seeds)} seed(s) x {len(conds)} condition(s) x {len(arms)} arm(s), "
          f"{cfg.train.steps} steps each on {device.type}", flush=True)
    results = Results("answer", cfg, body={"task": cfg.task, "paper": PAPER[cfg.task], "conditions": {}})
    with recording(results, cfg.out):
        for cond in conds:
            task = cond.make_task(0)
            results["conditions"][cond.label] = {
                "pad": cond.pad, "mode": cond.mode, "prompt_len": task.prompt_len, "answer_len": task.answer_len,
                "example": _example(task), "runs": {}}
        if not train_grid(cfg, results, conds, lambda cell: _scorer(cfg, cell, device)):
            return results.write(cfg.out, Status.INTERRUPTED)
        results["summary"] = summarise(results.body)
        results["comparisons"] = compare(results.body, pairs)
        if cfg.task == "multiply" and len(conds) > 1:
            results["filler_gain"] = filler_gain(results.body, conds[0].label, conds[-1].label, pairs)
        data = results.write(cfg.out, Status.COMPLETED)
    return publish(cfg.out, data, report.write, report.summary_text)


def _example(task: AnswerTask) -> dict:
    from myopia.tasks.base import batch_generator

    prompt, answer = task.sample(batch_generator(10**6, 9, 0), 1)
    return {"prompt": task.decode(prompt[0]), "answer": task.decode(answer[0])}


def _scorer(cfg: AnswerExperiment, cell: Cell, device):
    """Each trained arm of one condition and seed: its answers to held-out prompts by greedy
    generation (and teacher-forced), with how many of those prompts training drew too. With
    ``--exclude_heldout`` the task first leaves them out of its training stream."""
    task, train_cfg, label, seed = cell.task, cell.train, cell.condition.label, cell.seed
    score_batch = min(cfg.train.batch_size, 512)
    _exclude_heldout(cfg, task, train_cfg, score_batch, cell.folder)
    seen: dict = {}  # steps trained -> the training prompts' keys (regenerated once per step count)

    def score_arm(arm, model, result) -> dict:
        if result.steps not in seen:
            seen[result.steps] = training_prompt_keys(task, result.steps, train_cfg.batch_size, train_cfg.grad_accum)
        scores = score(model, task, cfg.eval_samples, score_batch, device,
                       seen=seen[result.steps])
        g = scores["generated"]
        unseen = ("training drew every held-out prompt" if g["unseen"] is None else
                  f"{g['unseen']['exact_match']:.3f} on the {g['unseen']['n']} never drawn in training")
        print(f"  -> {label} seed {seed} {arm.name}: exact match {g['exact_match']:.3f} "
              f"[{g['exact_match_ci'][0]:.3f}, {g['exact_match_ci'][1]:.3f}], first token "
              f"{g['position_accuracy'][0]:.3f}, {unseen}, "
              f"answer loss {result.eval['loss']:.4f} ({result.seconds:.0f} s)",
              flush=True)
        return {"eval_loss": result.eval["loss"], "train_seconds": result.seconds, "steps": result.steps, **scores}

    return score_arm


def _exclude_heldout(cfg: AnswerExperiment, task: AnswerTask, train_cfg: TrainConfig, score_batch: int,
                     arm_root: str) -> None:
    """With ``--exclude_heldout``, keep the scored prompts and those of the held-out loss out of ``task``'s
    training stream. That stream then depends on the held-out settings, so they are recorded in
    ``arm_root/heldout.json`` and a resume that changes them (or turns the option on or off) is refused."""
    record: dict = {"exclude_heldout": cfg.exclude_heldout}
    if cfg.exclude_heldout:
        record.update(eval_samples=cfg.eval_samples, eval_batches=train_cfg.eval_batches,
                      batch_size=train_cfg.batch_size)
    path = os.path.join(arm_root, "heldout.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
    else:  # a run directory from before this record excluded nothing
        before = {"exclude_heldout": False} if os.path.isdir(arm_root) and os.listdir(arm_root) else record
    if before != record:
        trained = ", ".join(f"{key}={value}" for key, value in before.items() if record.get(key) != value)
        raise ConfigError(f"{arm_root} was trained with {trained}; the training stream depends on it under "
                          "--exclude_heldout, so resume with the same settings or choose a new --out")
    os.makedirs(arm_root, exist_ok=True)
    atomic_write_text(path, json.dumps(record) + "\n")
    if cfg.exclude_heldout:
        task.exclude(torch.cat([heldout_prompts(task, cfg.eval_samples, score_batch),
                                *(task.heldout_examples(i, train_cfg.batch_size)[0]
                                  for i in range(train_cfg.eval_batches))]))
        for step in range(min(train_cfg.steps, 16)):  # a held-out set that leaves (almost) nothing fails now
            task.train_batch(step, 0, train_cfg.batch_size)


def _first_index(entry: dict) -> int:
    """The answer position of the hard token: the source's child for path-star (the last answer token in
    reverse mode), else the first."""
    return entry["answer_len"] - 1 if entry.get("mode") == "reverse" else 0


def _rest(accuracy: list[float], first: int) -> float | None:
    others = [a for j, a in enumerate(accuracy) if j != first]
    return sum(others) / len(others) if others else None


def summarise(results: dict) -> dict:
    """Per condition and arm: means and 95% t-intervals over seeds (generated and teacher-forced)."""
    summary: dict = {}
    for label, entry in results["conditions"].items():
        first = _first_index(entry)
        for arm, runs in runs_by_arm(entry).items():
            out = {"seeds": len(runs), "eval_loss": mean_ci([r["eval_loss"] for r in runs])}
            for kind in ("generated", "teacher_forced"):
                acc = [r[kind]["position_accuracy"] for r in runs]
                out[kind] = {
                    "exact_match": mean_ci([r[kind]["exact_match"] for r in runs]),
                    "position_accuracy": [mean_ci([a[j] for a in acc]) for j in range(len(acc[0]))],
                    "first": mean_ci([a[first] for a in acc]),
                }
                if len(acc[0]) > 1:
                    out[kind]["rest"] = mean_ci([_rest(a, first) for a in acc])
                if len(runs) == 1:
                    out[kind]["exact_match_wilson"] = runs[0][kind]["exact_match_ci"]
                # over the seeds whose training left some held-out prompts undrawn (older results: none)
                unseen = [r[kind]["unseen"] for r in runs if r[kind].get("unseen")]
                if unseen:
                    out[kind]["unseen_exact_match"] = mean_ci([u["exact_match"] for u in unseen])
                    out[kind]["unseen_n"] = sum(u["n"] for u in unseen)
            if all("seen_in_training" in r for r in runs):
                out["seen_in_training"] = mean_ci([r["seen_in_training"] / r["generated"]["n"] for r in runs])
            summary.setdefault(label, {})[arm] = out
    return summary


def compare(results: dict, pairs: list[Pair]) -> dict:
    """Per condition and pair: treatment − baseline exact match (generated), paired by seed."""
    out: dict = {}
    for label, entry in results["conditions"].items():
        for pair in pairs:
            runs = paired_runs(entry, pair)
            if runs:
                out.setdefault(label, {})[pair.label] = {
                    "treatment": pair.treatment, "baseline": pair.baseline, "seeds": len(runs),
                    "exact_match": mean_ci([r[pair.treatment]["generated"]["exact_match"]
                                            - r[pair.baseline]["generated"]["exact_match"] for r in runs])}
    return out


def filler_gain(results: dict, low: str, high: str, pairs: list[Pair]) -> dict:
    """Exact match at the largest pad minus at the smallest, per arm (paired by seed), and per pair the
    treatment's gain minus the baseline's."""
    lo, hi = results["conditions"][low]["runs"], results["conditions"][high]["runs"]
    seeds = [s for s in lo if s in hi]

    def gains(arm):
        return [hi[s][arm]["generated"]["exact_match"] - lo[s][arm]["generated"]["exact_match"]
                for s in seeds if arm in lo[s] and arm in hi[s]]

    arms = list(dict.fromkeys(a for s in seeds for a in lo[s]))
    out = {"from": low, "to": high, "arms": {a: {**mean_ci(gains(a)), "per_seed": gains(a)} for a in arms},
           "pairs": {}}
    for pair in pairs:
        t, b = gains(pair.treatment), gains(pair.baseline)
        if t and b:
            out["pairs"][pair.label] = mean_ci([x - y for x, y in zip(t, b)])
    return out


__all__ = ["compare", "filler_gain", "run", "summarise"]
