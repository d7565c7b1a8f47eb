"""Analyses across the cuts of one ``myopia lm`` run: the gap as a function of the horizon, and
per-layer cuts (single layers, or disjoint sets of layers such as thirds of the blocks) against the
all-layer cut.

- **Horizon curve.** Comparisons with one baseline whose treatments are myopic cuts that differ only
  in their horizon (mode, beta and layers equal; plain ``myopic`` is horizon 0, ``h >= T - 1`` is
  vanilla: :meth:`Cut.at_length`) form one curve of (w, gap, CI) sorted by w. It names the smallest
  horizon whose gap interval includes 0 and checks the two ends: gap(h=0) against the plain cut's gap
  and gap(h >= T-1) against 0, within their intervals.
- **Per-layer sums.** Comparisons with one baseline whose treatments are one cut applied in a single
  layer or a set of layers each (``myopic:layers=i``, ``myopic:layers=0-9``; pairwise disjoint),
  beside the same cut in every layer: is the sum of the parts' gaps the all-layer gap? (The results
  keep the keys ``singles`` and ``sum_of_single_layer_gaps`` for the parts.) The sum's interval is computed where the per-window losses
  are (:func:`layer_sums`, per seed, paired over held-out documents), then combined over seeds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from myopia.analysis.stats import cluster_bootstrap_ci
from myopia.attention.cut import MYOPIC_MODES, Cut
from myopia.runs.pairs import Pair


def _includes_zero(ci: dict) -> bool | None:
    if ci.get("low") is None:
        return None
    return ci["low"] <= 0.0 <= ci["high"]


def _overlap(a: dict, b: dict) -> bool | None:
    if a.get("low") is None or b.get("low") is None:
        return None
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def horizon_curves(comparisons: dict, cuts: dict[str, Cut], T: int) -> list[dict]:
    """One curve per (baseline, mode, beta, layers) with at least one horizon arm (module docstring).
    ``comparisons``: results' comparisons; ``cuts``: {arm name: Cut}; ``T``: the window length."""
    groups: dict[tuple, dict] = {}
    for label, c in comparisons.items():
        cut = cuts.get(c["treatment"])
        if cut is None or cut.mode not in MYOPIC_MODES:
            continue
        key = (c["baseline"], cut.mode, cut.beta, cut.layers)
        group = groups.setdefault(key, {"points": [], "plain": None, "horizons": 0})
        if cut.horizon is None:
            group["plain"] = (label, c)
        else:
            group["horizons"] += 1
            group["points"].append({"treatment": c["treatment"], "comparison": label, "horizon": cut.horizon,
                                    "effective": min(cut.horizon, T - 1), "gap": c["gap"]})
    curves = []
    for (baseline, mode, beta, layers), group in groups.items():
        if not group["horizons"]:
            continue
        points = sorted(group["points"], key=lambda p: (p["horizon"], p["treatment"]))
        plain = group["plain"]
        if plain is not None and not any(p["horizon"] == 0 for p in points):
            points.insert(0, {"treatment": plain[1]["treatment"], "comparison": plain[0], "horizon": 0,
                              "effective": 0, "gap": plain[1]["gap"]})
        closed = [p for p in points if _includes_zero(p["gap"])]
        smallest = closed[0]["horizon"] if closed else None
        checks: dict = {}
        zero = next((p for p in points if p["horizon"] == 0 and p["comparison"] != (plain or ("",))[0]), None)
        if zero is not None and plain is not None:
            checks["h0_agrees_with_plain"] = _overlap(zero["gap"], plain[1]["gap"])
        full = [p for p in points if p["horizon"] >= T - 1]
        if full:
            checks["full_horizon_includes_zero"] = all(_includes_zero(p["gap"]) for p in full)
        curves.append({
            "baseline": baseline, "mode": mode, "beta": beta, "layers": list(layers) if layers else None,
            "seq_len": T,
            "plain": ({"treatment": plain[1]["treatment"], "comparison": plain[0], "gap": plain[1]["gap"]}
                      if plain is not None else None),
            "points": points,
            "smallest_horizon_including_zero": smallest,
            "every_larger_includes_zero": (all(_includes_zero(p["gap"]) for p in points if p["horizon"] >= smallest)
                                           if smallest is not None else None),
            "checks": checks,
        })
    return curves


def layer_groups(pairs: list[Pair], cuts: dict[str, Cut]) -> list[dict]:
    """Per (baseline, cut without layers): the pairs whose treatment is that cut in one layer or one
    set of layers (e.g. thirds of the blocks), and the pair with the cut in every layer (needs at least
    two such parts, pairwise disjoint so that their gaps may add up, and the all-layer pair)."""
    groups: dict[tuple, dict] = {}
    for pair in pairs:
        cut = cuts.get(pair.treatment)
        if cut is None or not cut.cuts_gradient:
            continue
        whole = replace(cut, layers=None, name=None)
        group = groups.setdefault((pair.baseline, whole.spec), {"singles": {}, "all": None})
        if cut.layers is None:
            group["all"] = pair
        else:
            group["singles"][tuple(cut.layers)] = pair
    out = []
    for (baseline, spec), group in groups.items():
        parts = sorted(group["singles"])
        flat = [layer for part in parts for layer in part]
        if len(flat) != len(set(flat)):  # overlapping parts cannot add up: the single layers alone, if any
            parts = [part for part in parts if len(part) == 1]
        if group["all"] is None or len(parts) < 2:
            continue
        out.append({"label": f"{spec} vs {baseline}", "baseline": baseline, "cut": spec, "all": group["all"],
                    "singles": [(part[0] if len(part) == 1 else list(part), group["singles"][part])
                                for part in parts]})
    return out


def part_text(part: int | list[int]) -> str:
    """``layer 3`` or ``layers 0-9`` (a part of a per-layer table)."""
    if isinstance(part, int):
        return f"layer {part}"
    if part == list(range(part[0], part[-1] + 1)):
        return f"layers {part[0]}-{part[-1]}"
    return "layers " + ",".join(map(str, part))


def layer_sums(groups: list[dict], per_window: dict, doc_ids: np.ndarray, bootstrap: int) -> dict:
    """One seed: per group, the sum of the single-layer gaps, the all-layer gap and sum − all, each
    paired over held-out windows with a document-bootstrap interval."""
    out = {}
    for g in groups:
        base = per_window[g["baseline"]]
        singles = sum(per_window[p.treatment] - base for _, p in g["singles"])
        whole = per_window[g["all"].treatment] - base
        out[g["label"]] = {
            "baseline": g["baseline"], "cut": g["cut"], "all": g["all"].label,
            "layers": [layer for layer, _ in g["singles"]], "singles": [p.label for _, p in g["singles"]],
            "sum_of_single_layer_gaps": cluster_bootstrap_ci(singles.mean(1), doc_ids, bootstrap),
            "all_layer_gap": cluster_bootstrap_ci(whole.mean(1), doc_ids, bootstrap),
            "sum_minus_all": cluster_bootstrap_ci((singles - whole).mean(1), doc_ids, bootstrap),
        }
    return out


LAYER_SCALARS = ("sum_of_single_layer_gaps", "all_layer_gap", "sum_minus_all")


def horizon_lines(curves: list[dict], T: int) -> list[str]:
    """The report section for the horizon curves."""
    from myopia.analysis.stats import format_ci

    text: list[str] = []
    for curve in curves:
        where = f", layers {curve['layers']}" if curve["layers"] else ""
        beta = f"@{curve['beta']:g}" if curve["beta"] else ""
        text += [f"## Gap vs horizon ({curve['mode']}{beta}:h=w{where} − {curve['baseline']}; T = {T})", "",
                 "Horizon w: at every layer the gradient still crosses up to w positions back; w = 0 is the "
                 f"plain cut, w ≥ T − 1 = {T - 1} is vanilla exactly.", "",
                 "| w | arm | gap [95% CI] | interval includes 0 |", "|---|---|---|---|"]
        for p in curve["points"]:
            inc = _includes_zero(p["gap"])
            text.append(f"| {p['horizon']}{' (= T−1: vanilla)' if p['horizon'] >= T - 1 else ''} | {p['treatment']} | "
                        f"{format_ci(p['gap'])} | {'-' if inc is None else ('yes' if inc else 'no')} |")
        text.append("")
        w = curve["smallest_horizon_including_zero"]
        if w is None:
            text.append("No horizon's gap interval includes 0.")
        else:
            rest = ("and every larger horizon's does too" if curve["every_larger_includes_zero"]
                    else "but not every larger horizon's does")
            text.append(f"The smallest horizon whose gap interval includes 0: **w = {w}** ({rest}).")
        checks = curve["checks"]
        if curve["plain"] is not None:
            text.append(f"Plain cut ({curve['plain']['treatment']}): gap {format_ci(curve['plain']['gap'])}.")
        if "h0_agrees_with_plain" in checks:
            text.append("Check: gap(h=0) " + ("agrees" if checks["h0_agrees_with_plain"] else "**does not agree**")
                        + " with the plain cut's gap within their intervals.")
        if "full_horizon_includes_zero" in checks:
            text.append(f"Check: gap(h=T−1) " + ("includes 0" if checks["full_horizon_includes_zero"]
                                                 else "**does not include 0**") + " within its interval.")
        text.append("")
    return text


def layer_lines(layer_results: dict, comparisons: dict) -> list[str]:
    """The report section for the per-layer sums."""
    from myopia.analysis.stats import format_ci

    text: list[str] = []
    for label, g in layer_results.items():
        text += [f"## Per-layer cuts: {g['cut']} in one part of the layers at a time vs in all ({g['baseline']} "
                 "baseline)", "", "| cut | gap [95% CI] |", "|---|---|"]
        for layer, pair_label in zip(g["layers"], g["singles"]):
            text.append(f"| {part_text(layer)} only ({comparisons[pair_label]['treatment']}) | "
                        f"{format_ci(comparisons[pair_label]['gap'])} |")
        text += [f"| sum of the parts' gaps | {format_ci(g['sum_of_single_layer_gaps'])} |",
                 f"| every layer ({comparisons[g['all']]['treatment']}) | {format_ci(g['all_layer_gap'])} |",
                 f"| sum − all | {format_ci(g['sum_minus_all'])} |", ""]
        inc = _includes_zero(g["sum_minus_all"])
        if inc is not None:
            text += [("The sum of the parts' gaps equals the all-layer gap within the interval (sum − all "
                      "includes 0)." if inc else "The sum of the parts' gaps differs from the all-layer gap "
                      "(the interval of sum − all excludes 0): the layers' contributions do not add."), ""]
    return text


def plot_horizon(curves: list[dict], path: str, T: int) -> str | None:
    """``gap_vs_horizon.png``: gap against w on a symmetric-log axis (0 and T−1 shown), one line per
    curve, with the plain cut's gap and 0 as reference lines."""
    from myopia.analysis import plots

    plt = plots.pyplot()
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ticks: set[int] = set()
    for curve in curves:
        x = [p["effective"] for p in curve["points"]]
        ticks |= set(x)
        y = [p["gap"]["mean"] for p in curve["points"]]
        err = [[p["gap"]["mean"] - (p["gap"]["low"] if p["gap"]["low"] is not None else p["gap"]["mean"])
                for p in curve["points"]],
               [(p["gap"]["high"] if p["gap"]["high"] is not None else p["gap"]["mean"]) - p["gap"]["mean"]
                for p in curve["points"]]]
        name = f"{curve['mode']}{'@%g' % curve['beta'] if curve['beta'] else ''}:h=w" + \
            (f":layers={curve['layers']}" if curve["layers"] else "") + f" − {curve['baseline']}"
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{name} (95% CI)")
        if curve["plain"] is not None:
            ax.axhline(curve["plain"]["gap"]["mean"], color=line[0].get_color(), ls=":", lw=1,
                       label=f"plain cut ({curve['plain']['treatment']})")
    ax.axhline(0, color="black", lw=0.8, label="no gap")
    ax.set_xscale("symlog", linthresh=1)
    ticks = sorted(ticks)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t}\n(T−1)" if t == T - 1 else str(t) for t in ticks])
    plots.finish_axis(ax, "horizon w (positions the gradient may cross per layer)", "gap, treatment − baseline (nats)", "Gap vs horizon")
    return plots.save_figure(fig, path)


__all__ = ["LAYER_SCALARS", "horizon_curves", "horizon_lines", "layer_groups", "layer_lines", "layer_sums",
           "part_text", "plot_horizon"]
