"""``myopia lm``'s report: the summary printed at the end, report.md and its plots, one section per
compared pair of arms (the paper's numbers beside the myopic − vanilla pair)."""

from __future__ import annotations

import os

from myopia.analysis import plots
from myopia.analysis.stats import format_ci
from myopia.experiments.lm import cuts, decodability, steps
from myopia.experiments.lm.config import PAPER, PAPER_LONG_WINDOW
from myopia.models.hf.presets import HF_PRESETS
from myopia.runs import feature_attribution, gradient_geometry
from myopia.runs.pairs import PAPER_PAIR
from myopia.runs.results import write_report as write_lines


def summary_text(results: dict) -> str:
    lines = ["", f"Precision: {resolved_precision(results)} ({(results.get('precision') or {}).get('reason', 'recorded setting')})",
             f"Held-out cross-entropy (nats/token, 95% CI {ci_text(len(results['seeds']))}):"]
    if "start_loss" in results:
        lines.append(f"  {'start':>10}: {format_ci(results['start_loss'])} (the model every arm starts from)")
    for name, a in results["arms"].items():
        vs = (results.get("vs_start") or {}).get(name)
        lines.append(f"  {name:>10}: {format_ci(a['loss'])}" + (f"  ({name} - start: {format_ci(vs)})" if vs else ""))
    for label, c in results.get("comparisons", {}).items():
        pos0 = c["gap_per_position"][0]
        first = c.get("first_position_gap")
        lines.append(f"  gap ({c['treatment']} - {c['baseline']}): {format_ci(c['gap'])}; at position 0: "
                     f"{format_ci(pos0)}" + (f", over all held-out tokens: {format_ci(first)}" if first else "")
                     + (f" (paper, GPT-2 124M: {paper_number('gap')}, position 0: {paper_number('position0_gap')})"
                        if label == PAPER_PAIR.label else ""))
    for curve in results.get("horizon_curves") or []:
        w = curve["smallest_horizon_including_zero"]
        lines.append(f"  gap vs horizon ({curve['mode']}:h=w - {curve['baseline']}): smallest horizon whose gap interval "
                     f"includes 0: {'none' if w is None else w}")
    if "local_myopia_bonus" in results:
        lines.append(f"  local myopia bonus (vanilla - local-myopic): {format_ci(results['local_myopia_bonus'])} "
                     f"(paper: {paper_number('local_bonus')})")
    return "\n".join(lines)


def paper_gap(label: str, key: str = "gap") -> str:
    """The paper's figure for a comparison ('-' unless it is the paper's myopic − vanilla pair)."""
    return paper_number(key) if label == PAPER_PAIR.label else "-"


def paper_number(key: str) -> str:
    """The paper's figure for ``key`` as the reports print it: 3.40, +0.12, -0.10 ('-' if none)."""
    value = PAPER.get(key)
    if not isinstance(value, float):
        return "-"
    return f"{value:+.2f}" if key in ("gap", "position0_gap", "local_bonus") else f"{value:.2f}"


def ci_text(n_seeds: int, start: dict | None = None) -> str:
    """What the intervals of a run with ``n_seeds`` seeds resample (combine_seeds' rule), and whether
    they are conditional on one starting model (``start``: results' ``start``)."""
    if n_seeds > 1 and start and start.get("conditional_on_one_start"):
        return (f"over {n_seeds} seeds, conditional on one starting model: the seeds share it and differ in "
                "fine-tuning data order only, so the variance of pretraining is not included "
                "(--pretrain.per_seed true includes it)")
    if n_seeds > 1:
        return f"over {n_seeds} seeds"
    return "by bootstrap over held-out documents; one seed, so run-to-run variance is not included"


def model_text(cfg: dict) -> str:
    if cfg.get("hf_model"):
        return f"{cfg['hf_model']} (Hugging Face)"
    return f"{cfg['model']['n_layer']} layers, d={cfg['model']['n_embd']}"


def start_text(cfg: dict) -> str:
    """How the arms' starting model was made, for the report ('' = fresh weights)."""
    p = cfg.get("pretrain") or {}
    if p.get("steps") and p.get("per_seed"):
        return (f", each seed's arms fine-tuning that seed's own vanilla model pretrained for {p['steps']} steps "
                f"(lr {p['lr'] or cfg['optim']['lr']}, seed {p['seed']} + the seed)")
    if p.get("steps"):
        return (f", each fine-tuning one vanilla model pretrained for {p['steps']} steps (lr "
                f"{p['lr'] or cfg['optim']['lr']}, seed {p['seed']})")
    if cfg.get("init_from"):
        return f", each fine-tuning the trained model {cfg['init_from']}"
    if cfg.get("hf_model") and cfg["hf_model"] not in HF_PRESETS:
        return f", each fine-tuning the pretrained {cfg['hf_model']}"
    return ""


def write_report(out: str, results: dict) -> None:
    made = []
    arms = results["arms"]
    comparisons = results.get("comparisons", {})
    seeds = results["seeds"]
    series = {name: [(list(range(len(a["per_position"]))), a["per_position"])] for name, a in arms.items()}
    if plots.loss_curves(series, os.path.join(out, "loss_by_position.png"), "Held-out loss by position",
                         "cross-entropy (nats)", log=False, xlabel="position"):
        made.append("loss_by_position.png")
    if comparisons:
        # Per pair, the mean first, then one thinner line per seed.
        several = len(results["per_seed"]) > 1
        gaps = {}
        for label, c in comparisons.items():
            runs = [[g["mean"] for g in c["gap_per_position"]]]
            if several:
                runs += [[g["mean"] for g in r["comparisons"][label]["gap_per_position"]]
                         for r in results["per_seed"].values()]
            name = f"{c['treatment']} - {c['baseline']}"
            gaps[name if not several else f"{name}: mean (dark), {len(runs) - 1} seeds (light)"] = [
                (list(range(len(r))), r) for r in runs]
        if plots.loss_curves(gaps, os.path.join(out, "gap_by_position.png"), "Gap by position", "nats",
                             reference=0.0, log=False, xlabel="position", reference_label="no gap"):
            made.append("gap_by_position.png")
    cfg = results["config"]
    env = results["environment"]
    vs_start = results.get("vs_start") or {}
    rows = ([f"| start model (step 0; CI over held-out documents) | {format_ci(results['start_loss'])} | - | - |"]
            if "start_loss" in results else [])
    rows += [f"| {name} | {format_ci(a['loss'])} | {format_ci(vs_start[name]) if name in vs_start else '-'} | "
             f"{paper_number(name.replace('_', '-'))} |" for name, a in arms.items()]
    text = ["# Natural-language myopia gap (Wu et al. 2024, §4.1)", "", precision_text(results), "",
            f"Corpus {cfg['data']['corpus']}, tokenizer {cfg['data']['tokenizer']}, {cfg['data']['seq_len']}-token "
            f"windows; model {model_text(cfg)}; {cfg['train']['steps']} "
            f"steps of {windows_per_step(cfg['train'])} windows, AdamW lr {cfg['optim']['lr']} in every arm"
            f"{start_text(cfg)}; "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. "
            f"Held-out: {results['heldout']['windows']} windows from {results['heldout']['documents']} documents "
            f"never trained on. {env['device']}, torch {env['torch']}, {env['date']}. "
            f"Intervals: 95% CI {ci_text(len(seeds), results.get('start'))}.", "",
            f"| arm | held-out CE [95% CI] | arm − start model, paired | paper ({PAPER['model']}) |",
            "|---|---|---|---|", *rows, ""]
    used = results.get("resources") or {}
    if used:
        memory = f", peak memory {used['peak_rss_mib'] / 1024:.1f} GiB (resident, the whole process)" \
            if used.get("peak_rss_mib") else ""
        text += [f"Wall time {used['wall_seconds'] / 60:.1f} min since the command started{memory}; "
                 f"{env.get('threads', '?')} threads.", ""]
    by_step = {label: c["by_step"] for label, c in comparisons.items() if c.get("by_step")}
    if by_step:
        main = PAPER_PAIR.label if PAPER_PAIR.label in by_step else next(iter(by_step))
        if steps.plot(by_step, comparisons, main, os.path.join(out, "gap_by_step.png")):
            made.append("gap_by_step.png")
        text += steps.report_lines(by_step, comparisons, main)
    for label, check in (results.get("first_step_check") or {}).items():
        c = comparisons[label]
        tolerance = 2e-2 if resolved_precision(results) == "bf16" else 1e-4
        verdict = ("the treatment's training forward is the baseline's" if check["max_abs"] <= tolerance else
                   f"MORE THAN {tolerance:g} nats: the treatment's training forward differs from the baseline's, "
                   "a bug to report")
        text += [f"Training forward check ({c['treatment']} vs {c['baseline']}): the first step's training loss (same "
                 f"batch, start weights, before any update) differs by at most {check['max_abs']:.2g} nats over the "
                 "seeds (" + ", ".join(f"{d:+.2g}" for d in check["per_seed"]) + f"): {verdict}.", ""]
    long = results.get("long_window")
    if long:
        if plot_long_window(long, results.get("start_model"), os.path.join(out, "gap_by_position_long.png")):
            made.append("gap_by_position_long.png")
        text += long_window_lines(long)
    if comparisons:
        text += ["## Gaps (treatment − baseline, paired; nats)", "",
                 "| treatment − baseline | gap [95% CI] | position 0 | last position | position 0, all held-out "
                 "tokens | paper gap | paper position 0 |", "|---|---|---|---|---|---|---|"]
        for label, c in comparisons.items():
            first = c.get("first_position_gap")
            text.append(f"| {c['treatment']} − {c['baseline']} | **{format_ci(c['gap'])}** | "
                        f"{format_ci(c['gap_per_position'][0])} | {format_ci(c['gap_per_position'][-1])} | "
                        f"{format_ci(first) if first else '-'} | {paper_gap(label)} | "
                        f"{paper_gap(label, 'position0_gap')} |")
        first_n = next((c["first_position_gap"]["n"] for c in results["per_seed"][str(seeds[0])]["comparisons"].values()
                        if "first_position_gap" in c), None)
        text += [""] + ([f"Position 0 on all held-out tokens: {first_n:,} tokens, each as a one-token context "
                         "(position 0 sees only its own token)."] if first_n else [])
        if PAPER_PAIR.label in comparisons:
            text.append(f"Myopia gap (myopic − vanilla): **{format_ci(comparisons[PAPER_PAIR.label]['gap'])}** nats "
                        f"(paper: {paper_number('gap')}).")
        text.append("")
    if len(seeds) > 1:
        names = list(arms)
        labels = list(comparisons)
        text += ["## Per seed (intervals: bootstrap over held-out documents)", "",
                 "| seed | " + " | ".join(names) + "".join(f" | gap {lb} | position-0 gap {lb}" for lb in labels) + " |",
                 "|---|" + "---|" * (len(names) + 2 * len(labels))]
        for seed, r in results["per_seed"].items():
            cells = [format_ci(r["arms"][n]) for n in names]
            for label in labels:
                c = r["comparisons"][label]
                p0 = c.get("first_position_gap") or c["gap_per_position"][0]
                cells += [format_ci(c["gap"]), format_ci(p0)]
            text.append(f"| {seed} | " + " | ".join(cells) + " |")
        text.append("")
    curves = results.get("horizon_curves") or []
    if curves:
        T = cfg["data"]["seq_len"]
        if cuts.plot_horizon(curves, os.path.join(out, "gap_vs_horizon.png"), T):
            made.append("gap_vs_horizon.png")
        text += cuts.horizon_lines(curves, T)
    if results.get("layer_sums"):
        text += cuts.layer_lines(results["layer_sums"], comparisons)
    for label, c in comparisons.items():
        if c.get("top_kl"):
            b, t = c["baseline"], c["treatment"]
            text += [f"## Largest KL({b} ‖ {t}) tokens (seed {seeds[0]})", "",
                     f"| KL | context | next | {b} top-1 | {t} top-1 |", "|---|---|---|---|---|"]
            for e in c["top_kl"]:
                ctx = e["context"].replace("|", "\\|").replace("\n", " ")
                text.append(f"| {e['kl']:.2f} | …{ctx} | {e['next']!r} | {e['baseline_top1']!r} | "
                            f"{e['treatment_top1']!r} |")
            text.append("")
    if "probes" in results:
        pr = results["probes"]
        for c in comparisons.values():
            b, t = c["baseline"], c["treatment"]
            if b not in pr or t not in pr:
                continue  # an arm whose forward is not vanilla's (bigram) is not probed
            text += [f"## Future-token probes, {t} vs {b}, seed {seeds[0]} (held-out accuracy over {pr['classes']} "
                     f"classes; always predicting the commonest class: "
                     f"{', '.join(f'{v:.3f}' for v in pr['majority_class_accuracy'])})", "",
                     "| layer | " + " | ".join(f"{b} t+{k} | {t} t+{k}" for k in pr["offsets"]) + " |",
                     "|---|" + "---|---|" * len(pr["offsets"])]
            for layer, rb, rt in zip(pr.get("layers", range(len(pr[b]))), pr[b], pr[t]):
                text.append(f"| {layer} | " + " | ".join(f"{x:.3f} | {y:.3f}" for x, y in zip(rb, rt)) + " |")
            text.append("")
    if "local_myopia_bonus" in results:
        text += [f"Local myopia bonus (vanilla − local-myopic): "
                 f"**{format_ci(results['local_myopia_bonus'])}** nats (paper: {paper_number('local_bonus')}). The "
                 "local-myopic model starts from the trained vanilla model and re-trains only the present "
                 "position's computation, reading the frozen vanilla model's past states through its own "
                 "pre-attention norm (the paper's code skipped that norm).", ""]
    geometry = results.get("gradient_geometry")
    if geometry is not None:
        pretrain_steps = (results["config"].get("pretrain") or {}).get("steps", 0)
        offsets = {label: pretrain_steps for label in geometry["runs"] if label != "pretraining"}
        if gradient_geometry.plot(geometry, os.path.join(out, "gradient_geometry.png"), offsets):
            made.append("gradient_geometry.png")
        text += gradient_geometry.report_lines(geometry)
        label = f"seed {seeds[0]} vanilla"
        start_run = geometry["runs"].get(label)
        if start_run and start_run[0]["step"] == 0 and results.get("start", {}).get("kind") != "fresh":
            text += gradient_geometry.layer_lines(start_run[0], f"the start model ({label})")
    lens = results.get(decodability.KEY)
    if lens is not None:
        if decodability.plot(lens, os.path.join(out, "future_lens.png")):
            made.append("future_lens.png")
        text += decodability.report_lines(lens)
    attribution = results.get(feature_attribution.KEY)
    if attribution is not None:
        if feature_attribution.plot(attribution, os.path.join(out, "feature_attribution.png")):
            made.append("feature_attribution.png")
        text += feature_attribution.report_lines(attribution)
        label = f"seed {seeds[0]} vanilla"
        if feature_attribution.plot_by_layer(attribution, label, 0, os.path.join(out, "feature_attribution_layers.png")):
            made.append("feature_attribution_layers.png")
        text += feature_attribution.step_lines(attribution, label, 0)
    text += [f"![{m}]({m})" for m in made]
    write_lines(out, text)


def resolved_precision(results: dict) -> str:
    """``fp32`` or ``bf16``: what the run computed in (runs before the key existed: their setting,
    auto then meaning float32 on a CPU)."""
    recorded = results.get("precision")
    if recorded:
        return recorded["resolved"]
    return "bf16" if results["config"]["train"].get("precision") == "bf16" else "fp32"


def precision_text(results: dict) -> str:
    """The report's precision line: what every training step and score computed in, and why."""
    recorded = results.get("precision") or {"resolved": resolved_precision(results), "reason": "recorded setting"}
    what = ("bf16 autocast (float32 weights and AdamW state, bfloat16 matrix products)"
            if recorded["resolved"] == "bf16" else "float32")
    return f"**Precision: {what}**; {recorded['reason']}. Training and every score alike."


def windows_per_step(train: dict) -> str:
    """``32`` or ``32 (4 micro-batches of 8)``."""
    accum = train.get("grad_accum", 1)
    total = train["batch_size"] * accum
    return f"{total}" if accum == 1 else f"{total} ({accum} micro-batches of {train['batch_size']})"


def long_window_lines(long: dict) -> list[str]:
    """The report's long-window section: the gap at a few positions beside the paper's Pythia-2.8B."""
    paper = PAPER_LONG_WINDOW["gap_at_position"]
    L = long["length"]
    shown = sorted({0, 1, 3, 10, 50, 100, 175, 250, L - 1} & set(range(L)))
    lines = [f"## Gap by position over {L}-token windows", "",
             f"{long['windows']} held-out windows of {L} tokens from {long['documents']} documents "
             f"({long['tokens']:,} tokens). Paper: {PAPER_LONG_WINDOW['model']}.", "",
             "| treatment − baseline | whole window | " + " | ".join(f"pos {t}" for t in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for label, c in long["comparisons"].items():
        lines.append(f"| {c['treatment']} − {c['baseline']} | {format_ci(c['gap'])} | "
                     + " | ".join(format_ci(c["gap_per_position"][t]) for t in shown) + " |")
    lines.append("| paper (Pythia-2.8B) | - | " + " | ".join(f"{paper[t]:+.2f}" if t in paper else "-" for t in shown) + " |")
    return lines + [""]


def plot_long_window(long: dict, start: dict | None, path: str) -> str | None:
    """Loss by position of every arm (and the start model) and each pair's gap beside the paper's points."""
    plt = plots.pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if start and start.get("long_window_per_position"):
        left.plot(start["long_window_per_position"], color="grey", lw=1, label="start model")
    for name, curve in long["arms"].items():
        left.plot(curve, lw=1, label=name)
    plots.finish_axis(left, "position", "held-out cross-entropy (nats)", f"Loss by position ({long['length']}-token windows)")
    for label, c in long["comparisons"].items():
        xs = list(range(len(c["gap_per_position"])))
        right.plot(xs, [g["mean"] for g in c["gap_per_position"]], lw=1, label=f"{c['treatment']} − {c['baseline']}")
        if c["gap_per_position"][0].get("low") is not None:
            right.fill_between(xs, [g["low"] for g in c["gap_per_position"]], [g["high"] for g in c["gap_per_position"]],
                               alpha=0.2)
    paper = PAPER_LONG_WINDOW["gap_at_position"]
    right.plot(list(paper), list(paper.values()), "ks", ms=5, label="paper: Pythia-2.8B (myopic − vanilla)")
    right.axhline(0.0, color="grey", ls="--", lw=1)
    plots.finish_axis(right, "position", "gap (nats)", "Gap by position")
    return plots.save_figure(fig, path)


__all__ = ["ci_text", "model_text", "paper_number", "start_text", "summary_text", "write_report"]
