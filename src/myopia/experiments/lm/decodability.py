"""Future-token decodability in ``myopia lm`` (``--future_lens.enabled true``): the future lens
(:mod:`myopia.analysis.future_lens`) of the start model and of the first seed's arms (or those of
``future_lens.seeds``, with intervals over seeds) on the same held-out positions, each kept beside its
model (a resumed run measures only what is missing), and gathered into ``results.json``'s
``future_lens`` with paired differences (each compared pair, and each arm against the start), a report
table and ``future_lens.png``."""

from __future__ import annotations

import os

import numpy as np
import torch

from myopia.analysis import plots
from myopia.analysis import future_lens as fl
from myopia.analysis.stats import format_ci, mean_ci
from myopia.config import to_dict
from myopia.experiments.lm.analysis import read_keyed, write_keyed

KEY = "future_lens"


def measure(cfg: fl.FutureLensConfig, task, model: torch.nn.Module, device, cache: str, key: str) -> dict:
    """The model's future lens with its per-position correctness (for paired differences), read from
    ``cache`` (an .npz beside the model's checkpoints) when it was measured under ``key``, else measured
    and written there."""
    found = load(cache, key)
    if found is not None:
        return found
    result = fl.future_lens(model, task, cfg, device, keep_positions=True)
    save(cache, key, result)
    return result


def save(path: str, key: str, result: dict) -> None:
    scored = result["positions_scored"]
    names = {f"a{i}": list(k) for i, k in enumerate(scored)}
    summary = {k: v for k, v in result.items() if k != "positions_scored"}
    write_keyed(path, key, {"summary": summary, "names": names}, {name: scored[tuple(k)] for name, k in names.items()})


def load(path: str, key: str) -> dict | None:
    found = read_keyed(path, key)
    if found is None:
        return None
    meta, arrays = found
    try:
        scored = {tuple(k): arrays[name] for name, k in meta["names"].items()}
    except KeyError:
        return None
    return {**meta["summary"], "positions_scored": scored}


def key_settings(cfg: fl.FutureLensConfig) -> dict:
    """The settings a cached lens was measured under: every one but ``seeds`` (which models are measured,
    not how), so that measuring more seeds' arms keeps the lenses already measured."""
    settings = to_dict(cfg)
    settings.pop("seeds", None)
    return settings


def gather(cfg: fl.FutureLensConfig, by_seed: dict[int, dict[str, dict]], pairs: list[tuple[str, str]],
           start: dict | None = None) -> dict:
    """``results.json``'s ``future_lens``. ``by_seed``: each measured seed's arms (``{arm: lens}``);
    ``start``: the start model's lens, shared by every seed. ``models`` and ``differences`` are the start
    model's and the first seed's: every model's summary and the paired top-1 differences
    ``treatment − baseline`` for ``pairs`` and for every arm against the start model, with intervals over
    documents. With several seeds, ``per_seed`` holds each seed's, and ``over_seeds`` every arm's
    accuracies and every paired difference as t-intervals over the seeds."""
    seeds = list(by_seed)  # the run's order: the first is the run's first seed
    shared = {"start": start} if start is not None else {}
    per_seed = {seed: _one_seed(cfg, {**shared, **by_seed[seed]}, pairs) for seed in seeds}
    if not per_seed:
        return {**_one_seed(cfg, shared, pairs), "seeds": []}
    out = {**per_seed[seeds[0]], "seeds": seeds}
    if len(seeds) > 1:
        out["per_seed"] = {str(seed): per_seed[seed] for seed in seeds}
        out["over_seeds"] = _over_seeds([per_seed[seed] for seed in seeds])
    return out


def _one_seed(cfg: fl.FutureLensConfig, models: dict[str, dict], pairs: list[tuple[str, str]]) -> dict:
    out = {"models": {name: {k: v for k, v in r.items() if k != "positions_scored"} for name, r in models.items()},
           "differences": {}}
    wanted = list(pairs) + [(name, "start") for name in models if name != "start" and "start" in models]
    for treatment, baseline in wanted:
        if treatment in models and baseline in models:
            out["differences"][f"{treatment} - {baseline}"] = fl.paired_difference(models[treatment], models[baseline], cfg)
    return out


def _over_seeds(seeds: list[dict]) -> dict:
    """t-intervals over seeds of the arms' accuracies (maps and ceiling) and of the paired differences,
    for the arms and differences every seed has (the start model is the same in each: left out)."""
    arms = [name for name in seeds[0]["models"] if name != "start" and all(name in s["models"] for s in seeds)]
    models = {}
    for name in arms:
        runs = [s["models"][name] for s in seeds]
        first = runs[0]
        models[name] = {
            "maps": {l: {k: {m: mean_ci([r["maps"][l][k][m]["mean"] for r in runs]) for m in metrics}
                         for k, metrics in by_k.items()} for l, by_k in first["maps"].items()},
            "ceiling": {k: {m: mean_ci([r["ceiling"][k][m]["mean"] for r in runs]) for m in metrics}
                        for k, metrics in first["ceiling"].items()}}
    labels = [label for label in seeds[0]["differences"] if all(label in s["differences"] for s in seeds)]
    differences = {label: {l: {k: mean_ci([s["differences"][label][l][k]["mean"] for s in seeds]) for k in by_k}
                           for l, by_k in seeds[0]["differences"][label].items()} for label in labels}
    return {"models": models, "differences": differences}


def report_lines(result: dict) -> list[str]:
    """The report's decodability section: top-1 accuracy per stream and offset for every model, the
    ceiling and skip-bigram rows, and the paired differences."""
    models = result["models"]
    first = next(iter(models.values()))
    offsets, layers = first["offsets"], first["layers"]
    names = list(models)
    lines = ["## Future-token decodability (Future Lens's linear map, decoded by the model's own head)", "",
             f"From the residual stream at t, a ridge map to the model's final normalised state at t + k, decoded "
             f"over the whole vocabulary: top-1 accuracy for the token at t + k + 1 (95% CI over documents), on "
             f"{first['positions'][str(offsets[0])]:,} held-out positions in {first['documents']} documents; maps "
             f"fitted on {first.get('fit_tokens', 0):,} training-side positions. Stream 0 is the embeddings; "
             f"{fl.FINAL} the final normalised state.", ""]
    lines += _accuracy_table(models, names, layers, offsets)
    lines.append("| skip-bigram from the token at t | " + " | ".join(
        format_ci(models[n]["skip_bigram"][str(k)]["top1"], 3) if models[n]["skip_bigram"] else "-"
        for k in offsets for n in names) + " |")
    for label, diff in result["differences"].items():
        lines += _difference_table(f"Paired difference {label} (top-1, 95% CI over documents):", diff, layers, offsets)
    over = result.get("over_seeds")
    if over and over["models"]:
        seeds = ", ".join(map(str, result["seeds"]))
        lines += ["", f"Over seeds {seeds} (each seed's arms with their own maps; mean and 95% t-interval over the "
                      f"{len(result['seeds'])} seeds). Top-1 accuracy:", ""]
        lines += _accuracy_table(over["models"], list(over["models"]), layers, offsets)
        for label, diff in over["differences"].items():
            caption = (f"Paired difference {label} over seeds {seeds} (top-1; each seed's mean over the same "
                       "held-out positions, 95% t-interval over seeds):")
            lines += _difference_table(caption, diff, layers, offsets)
    return lines + [""]


def _accuracy_table(models: dict, names: list[str], layers: list, offsets: list) -> list[str]:
    """Top-1 per stream (rows) for each offset and model (columns), then the ceiling row."""
    lines = ["| stream | " + " | ".join(f"{n} k={k}" for k in offsets for n in names) + " |",
             "|---|" + "---|" * (len(offsets) * len(names))]
    lines += [f"| {l} | " + " | ".join(format_ci(models[n]["maps"][str(l)][str(k)]["top1"], 3)
                                       for k in offsets for n in names) + " |" for l in layers]
    lines.append("| own prediction at t + k (ceiling) | " + " | ".join(
        format_ci(models[n]["ceiling"][str(k)]["top1"], 3) for k in offsets for n in names) + " |")
    return lines


def _difference_table(caption: str, diff: dict, layers: list, offsets: list) -> list[str]:
    """One paired difference per stream (rows) and offset (columns), under ``caption``."""
    return (["", caption, "", "| stream | " + " | ".join(f"k={k}" for k in offsets) + " |",
             "|---|" + "---|" * len(offsets)]
            + [f"| {l} | " + " | ".join(format_ci(diff[str(l)][str(k)], 4) for k in offsets) + " |" for l in layers])


def plot(result: dict, path: str) -> str | None:
    """Top-1 accuracy against the stream, one line per model and offset (the skip-bigram dotted). With
    several seeds the arms are drawn as their mean over seeds with the t-interval (``over_seeds``), the
    start model with its interval over documents."""
    plt = plots.pyplot()
    if plt is None:
        return None
    models = result["models"]
    first = next(iter(models.values()))
    offsets, layers = first["offsets"], first["layers"]
    over = result.get("over_seeds")
    lines = {name: (r, name) for name, r in models.items()}
    if over:
        n = len(result["seeds"])
        lines = {name: (over["models"][name], f"{name}, mean of {n} seeds (band: seeds)") if name in over["models"]
                 else (r, f"{name} (band: documents)") for name, r in models.items()}
    x = [max(l for l in layers if l != fl.FINAL) + 1 if l == fl.FINAL else l for l in layers]
    fig, axes = plt.subplots(1, len(offsets), figsize=(4.2 * len(offsets), 3.8), squeeze=False)
    for ax, k in zip(axes[0], offsets):
        for i, (r, label) in enumerate(lines.values()):
            cis = [r["maps"][str(l)][str(k)]["top1"] for l in layers]
            ax.plot(x, [c["mean"] for c in cis], "o-", ms=3, color=f"C{i}", label=label)
            if all(c["low"] is not None for c in cis):
                ax.fill_between(x, [c["low"] for c in cis], [c["high"] for c in cis], color=f"C{i}", alpha=0.15)
        if first["skip_bigram"]:
            ax.axhline(first["skip_bigram"][str(k)]["top1"]["mean"], color="grey", ls=":", lw=1, label="skip-bigram")
        plots.finish_axis(ax, "residual stream (0 = embeddings)", "top-1 accuracy", f"token at t + {k + 1} (k = {k})")
    return plots.save_figure(fig, path)


__all__ = ["KEY", "gather", "key_settings", "load", "measure", "plot", "report_lines", "save"]
