"""report.md and plots of ``myopia answer``, from its results dict."""

from __future__ import annotations

import os

from myopia.analysis import plots
from myopia.analysis.stats import format_ci
from myopia.runs.results import write_report


def _em(s: dict, kind: str = "generated") -> str:
    text = format_ci(s[kind]["exact_match"])
    wilson = s[kind].get("exact_match_wilson")
    return text + (f" [{wilson[0]:.3f}, {wilson[1]:.3f}]" if wilson else "")


def verdict(results: dict) -> str:
    """The calibration bar for multiplication: vanilla's filler gain ≥ 0.2 with its interval above 0,
    and the myopic arm's at most a third of vanilla's."""
    gain = results.get("filler_gain")
    if not gain or "vanilla" not in gain["arms"] or "myopic" not in gain["arms"]:
        return ""
    v, m = gain["arms"]["vanilla"], gain["arms"]["myopic"]
    above = v["low"] is not None and v["low"] > 0
    ok = above and v["mean"] >= 0.2 and m["mean"] <= v["mean"] / 3
    if ok:
        return (f"Filler tokens help the vanilla model (exact match +{v['mean']:.2f} from {gain['from']} to "
                f"{gain['to']}, 95% interval above 0) and not the myopic one ({m['mean']:+.2f}, at most a third of "
                "vanilla's): computing at filler positions is pre-caching, as in the paper.")
    interval = "" if v["low"] is None else f" [{v['low']:+.2f}, {v['high']:+.2f}]"
    return (f"The filler gain does not separate the arms as the bar asks at this budget (vanilla {v['mean']:+.2f}"
            f"{interval}, myopic {m['mean']:+.2f}; bar: vanilla ≥ 0.2 with its interval above 0, "
            "myopic ≤ vanilla / 3).")


def summary_text(results: dict) -> str:
    lines = ["", f"myopia answer ({results['task']}): exact match of greedy answers [95% CI over seeds]"]
    for label, arms in results.get("summary", {}).items():
        for arm, s in arms.items():
            g = s["generated"]
            lines.append(f"  {label:>12} {arm:>10}: exact {_em(s)} | first token {format_ci(g['first'])}"
                         + (f" | rest {format_ci(g['rest'])}" if "rest" in g else ""))
    gain = results.get("filler_gain")
    if gain:
        for arm, g in gain["arms"].items():
            lines.append(f"  filler gain ({gain['from']} -> {gain['to']}) {arm}: {format_ci(g)}")
    v = verdict(results)
    if v:
        lines.append(v)
    return "\n".join(lines)


def write(out: str, results: dict) -> None:
    made = make_plots(out, results)
    cfg, env, task = results["config"], results["environment"], results["task"]
    m = cfg["model"]
    paper = results["paper"]
    teacherless = any(c.get("mode") == "teacherless" for c in results["conditions"].values())
    text = [f"# Tasks with answers: {task}", ""]
    first = next(iter(results["conditions"].values()))
    text += [f"Example ({next(iter(results['conditions']))}): prompt `{first['example']['prompt']}` → answer "
             f"`{first['example']['answer']}` (one token per symbol; the loss is on the answer tokens only).", ""]
    text += [f"Model: {m['n_layer']} layers, d={m['n_embd']}, {m['n_head']} heads, from scratch. "
             f"{cfg['train']['steps']} steps of batch {cfg['train']['batch_size']}, AdamW lr {cfg['optim']['lr']}. "
             f"Seeds: {cfg['seeds']}. {cfg['eval_samples']} held-out prompts per model, answered by greedy generation"
             f"{' (teacherless mode: one forward pass with dummy answer inputs)' if teacherless else ''}. "
             f"Machine: {env['device']} ({env['machine']}), torch {env['torch']}, {env['date']}.", "",
             "Values: mean [95% t-interval over seeds]; with one seed, the Wilson interval of the proportion.", ""]
    rows = []
    for label, arms in results["summary"].items():
        for arm, s in arms.items():
            g, t = s["generated"], s["teacher_forced"]
            ref = "-"
            if task == "multiply":
                ref = str(paper["exact_match"].get(label, {}).get(arm, "-"))
            rows.append(f"| {label} | {arm} | {_em(s)} | {format_ci(g['first'])} | "
                        f"{format_ci(g['rest']) if 'rest' in g else '-'} | {format_ci(t['first'])} | "
                        f"{format_ci(t['rest']) if 'rest' in t else '-'} | {format_ci(s['eval_loss'])} | {ref} |")
    text += ["| condition | arm | exact match | first token | rest (mean) | teacher-forced first | "
             "teacher-forced rest | answer loss | paper |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    seen = [(label, arm, s) for label, arms in results["summary"].items() for arm, s in arms.items()
            if "seen_in_training" in s]
    if seen:
        excluded = (" Training was set to exclude them (`exclude_heldout`)." if cfg.get("exclude_heldout") else "")
        text += ["Held-out prompts that the training stream also drew (regenerated from the seeds), and exact "
                 "match on the others alone (over the seeds that left any)." + excluded, "",
                 "| condition | arm | drawn in training (fraction) | exact match, never drawn | never-drawn prompts |",
                 "|---|---|---|---|---|"]
        for label, arm, s in seen:
            g = s["generated"]
            text.append(f"| {label} | {arm} | {format_ci(s['seen_in_training'])} | "
                        + (f"{format_ci(g['unseen_exact_match'])} | {g['unseen_n']} |" if "unseen_exact_match" in g
                           else "- | 0 (training drew every one) |"))
        text += [""]
    if task == "multiply":
        text += [f"Paper ({paper['setting']}): exact match vanilla pad 5 0.36, pad 10 **0.99**; myopic pad 5 0.38, "
                 "pad 10 **0.06**. The paper column is filled where our condition has the paper's label.", ""]
    elif task == "path-star":
        text += [f"Reference ({paper['setting']}): first node after the source {paper['first_node']}. "
                 f"Chance here: 1/{cfg['path_star']['degree']} = {1 / cfg['path_star']['degree']:.2f}. "
                 "'first token' is the source's child in every mode (the last answer token in reverse mode); "
                 "'rest' is the mean over the other answer nodes.", ""]
    else:
        text += [f"Reference: {paper['setting']}. Chance: 0.5.", ""]
    gain = results.get("filler_gain")
    if gain:
        text += [f"Filler gain (exact match at {gain['to']} minus at {gain['from']}, paired by seed; paper: vanilla "
                 "+0.63, myopic −0.32):", "", "| arm | filler gain | per seed |", "|---|---|---|"]
        text += [f"| {arm} | {format_ci(g)} | {', '.join(f'{x:+.3f}' for x in g['per_seed'])} |"
                 for arm, g in gain["arms"].items()]
        text += [f"| {label} (difference) | {format_ci(c)} | |" for label, c in gain["pairs"].items()]
        text += ["", verdict(results), ""]
    comps = [f"| {label} | {c['treatment']} − {c['baseline']} | {format_ci(c['exact_match'])} | {c['seeds']} |"
             for label, pairs in results.get("comparisons", {}).items() for c in pairs.values()]
    if comps:
        text += ["Comparisons (exact match, treatment − baseline, paired by seed):", "",
                 "| condition | pair | Δ exact match | seeds |", "|---|---|---|---|", *comps, ""]
    for name in made:
        text += [f"![{name}]({name})", ""]
    write_report(out, text)


def make_plots(out: str, results: dict) -> list[str]:
    plt = plots.pyplot()
    if plt is None:
        return []
    import numpy as np

    made = []
    summary = results["summary"]
    labels = list(summary)
    arms = list(dict.fromkeys(a for s in summary.values() for a in s))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(labels) * len(arms)), 3.8))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        means, errs = [], [[], []]
        for label in labels:
            ci = summary[label].get(arm, {}).get("generated", {}).get("exact_match")
            mean = ci["mean"] if ci else float("nan")
            means.append(mean)
            errs[0].append(mean - ci["low"] if ci and ci["low"] is not None else 0.0)
            errs[1].append(ci["high"] - mean if ci and ci["high"] is not None else 0.0)
        ax.bar(np.arange(len(labels)) + (i - (len(arms) - 1) / 2) * width, means, width, yerr=errs, capsize=3,
               label=arm)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylim(0, 1.05)
    plots.finish_axis(ax, "condition", "exact match (greedy)", f"{results['task']}: exact match by arm")
    made.append(os.path.basename(plots.save_figure(fig, os.path.join(out, "exact_match.png"))))

    fig, axes = plt.subplots(1, len(labels), figsize=(3.8 * len(labels), 3.4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for arm in arms:
            s = summary[label].get(arm)
            if s is None:
                continue
            acc = [c["mean"] for c in s["generated"]["position_accuracy"]]
            ax.plot(range(len(acc)), acc, marker="o", label=f"{arm}")
            forced = [c["mean"] for c in s["teacher_forced"]["position_accuracy"]]
            ax.plot(range(len(forced)), forced, ls="--", alpha=0.6, label=f"{arm} (teacher-forced)")
        ax.set_ylim(0, 1.05)
        plots.finish_axis(ax, "answer position", "accuracy", label)
    made.append(os.path.basename(plots.save_figure(fig, os.path.join(out, "position_accuracy.png"))))
    return made
