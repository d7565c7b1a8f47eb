"""``myopia lm``'s held-out analysis: every arm scored on the same windows, every (treatment,
baseline) pair compared (paired gap, by position, at position 0, largest-KL tokens, future-token
probes), and the seeds' analyses combined."""

from __future__ import annotations

import heapq

import numpy as np
import torch
import torch.nn.functional as F

from myopia.analysis.probes import ProbeStats
from myopia.analysis.stats import cluster_bootstrap_ci, mean_ci
from myopia.attention.cut import Cut
from myopia.config import ConfigError
from myopia.experiments.lm.config import AnalysisConfig
from myopia.experiments.lm.cuts import LAYER_SCALARS, layer_groups, layer_sums
from myopia.runs.arms import LOCAL_ARM
from myopia.runs.pairs import Pair, default_pairs
from myopia.tasks.text import TextTask

_SCALARS = ("gap", "first_position_gap")
"""A comparison's scalar CIs (combined over seeds like the arms' losses)."""


@torch.no_grad()
def analyse(a: AnalysisConfig, task: TextTask, models: dict, device: torch.device, pairs: list[Pair] | None = None,
            full: bool = True, probe_arms: set[str] | None = None, start: dict | None = None,
            cuts: dict[str, Cut] | None = None) -> dict:
    """One seed's held-out analysis (intervals over documents) of ``models`` ({arm name: model}):
    every arm's loss, and for every pair (default: each arm against vanilla) its paired gap. ``full``:
    also the largest-KL tokens and the probes (of the paired arms in ``probe_arms``; default all).
    ``start`` (:func:`score_start`): the arms' starting model's scores on the same windows, against
    which each arm's loss is compared (``vs_start``: arm − start, paired). ``cuts`` ({arm name: its
    cut}) finds the per-layer cuts whose gaps are summed (:func:`~myopia.experiments.lm.cuts.layer_groups`)."""
    pairs = default_pairs(list(models)) if pairs is None else pairs
    limit = a.heldout_windows or None
    for m in models.values():
        m.eval().to(device)
    losses = {name: [] for name in models}
    docs = []
    tops: dict[Pair, list] = {pair: [] for pair in pairs}
    window = 0
    for logps, y, doc in heldout_log_probs(task, models, device, limit):
        for name, logp in logps.items():
            losses[name].append(-logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).cpu())
        docs.append(doc)
        if full and a.top_kl:
            for pair, top in tops.items():
                _keep_top_kl(top, a.top_kl, logps[pair.baseline], logps[pair.treatment], window)
        window += y.shape[0]
    per_window = {name: torch.cat(v).double().numpy() for name, v in losses.items()}  # (N, T)
    doc_ids = torch.cat(docs).numpy()
    out: dict = {"heldout": {"windows": len(doc_ids), "documents": len(np.unique(doc_ids)),
                             "tokens": int(per_window[next(iter(per_window))].size)}}
    out["arms"] = {name: {"loss": cluster_bootstrap_ci(arr.mean(1), doc_ids, a.bootstrap),
                          "per_position": arr.mean(0).tolist()} for name, arr in per_window.items()}
    paired = list(dict.fromkeys(name for pair in pairs for name in (pair.baseline, pair.treatment)))
    first = first_docs = None
    if pairs and a.first_position_tokens >= 0:
        first, first_docs = first_position_losses(task, {k: models[k] for k in paired}, device,
                                                  a.first_position_tokens)
    comparisons = {}
    for pair in pairs:
        diff = per_window[pair.treatment] - per_window[pair.baseline]
        c = {"treatment": pair.treatment, "baseline": pair.baseline,
             "gap": cluster_bootstrap_ci(diff.mean(1), doc_ids, a.bootstrap),
             "gap_per_position": [cluster_bootstrap_ci(diff[:, t], doc_ids, a.bootstrap) for t in range(diff.shape[1])]}
        if first is not None:
            c["first_position_gap"] = cluster_bootstrap_ci(first[pair.treatment] - first[pair.baseline], first_docs,
                                                           a.bootstrap)
        if full:
            c["top_kl"] = [_kl_example(task, limit, item) for item in sorted(tops[pair], reverse=True)]
        comparisons[pair.label] = c
    out["comparisons"] = comparisons
    groups = layer_groups(pairs, cuts or {})
    if groups:
        out["layer_sums"] = layer_sums(groups, per_window, doc_ids, a.bootstrap)
    probed = [n for n in paired if probe_arms is None or n in probe_arms]
    if full and probed and a.probe_offsets:
        out["probes"] = probes(a, task, {k: models[k] for k in probed}, device)
    if {"vanilla", LOCAL_ARM} <= set(models):
        bonus = per_window["vanilla"] - per_window[LOCAL_ARM]
        out["local_myopia_bonus"] = cluster_bootstrap_ci(bonus.mean(1), doc_ids, a.bootstrap)
    if start is not None:
        out["vs_start"] = {name: cluster_bootstrap_ci((arr - start["per_window"]).mean(1), doc_ids, a.bootstrap)
                           for name, arr in per_window.items()}
    if a.long_window:
        out["long_window"] = long_window_analysis(a, task, {k: models[k] for k in paired} if pairs else models,
                                                  device, pairs)
    return out


def model_context(model: torch.nn.Module) -> int | None:
    """The longest window ``model`` takes (myopia's GPT: block_size; Hugging Face: max_position_embeddings)."""
    config = getattr(model, "config", None)
    for key in ("block_size", "max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_context(model: torch.nn.Module, length: int, name: str) -> None:
    """One-line error if ``model`` cannot take ``length``-token windows (analysis.long_window)."""
    context = model_context(model)
    if context is not None and length > context:
        raise ConfigError(f"analysis.long_window={length}: {name} has a context of {context} tokens; use "
                          f"--analysis.long_window {context} or less (or a model with a longer context)")


@torch.no_grad()
def long_window_losses(task: TextTask, models: dict, device: torch.device, length: int, count: int,
                       batch_size: int = 8) -> tuple[dict, np.ndarray]:
    """Each model's loss at every position of long held-out windows: ``({name: (N, length)}, documents)``;
    a model whose context is shorter is a one-line error."""
    for name, m in models.items():
        check_context(m, length, name)
    rows = task.windows_of(length, count)
    idx = rows[:, :1] + np.arange(length + 1)
    losses = {name: [] for name in models}
    for i in range(0, len(rows), batch_size):
        w = torch.from_numpy(task.heldout.tokens[idx[i:i + batch_size]].astype(np.int64)).to(device)
        for name, m in models.items():
            m.eval().to(device)
            logits = m(w[:, :-1]).float()
            losses[name].append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").double().cpu())
    return {name: torch.cat(v).numpy() for name, v in losses.items()}, rows[:, 1]


def long_window_analysis(a: AnalysisConfig, task: TextTask, models: dict, device: torch.device,
                         pairs: list[Pair]) -> dict:
    """Loss and paired gap by position over ``analysis.long_window``-token windows (the paper's
    Pythia-2.8B curve, R12, used 256), intervals over documents."""
    per_window, docs = long_window_losses(task, models, device, a.long_window, a.long_window_count)
    out = {"length": a.long_window, "windows": len(docs), "documents": len(np.unique(docs)),
           "tokens": int(len(docs) * a.long_window),
           "arms": {name: arr.mean(0).tolist() for name, arr in per_window.items()}, "comparisons": {}}
    for pair in pairs:
        diff = per_window[pair.treatment] - per_window[pair.baseline]
        out["comparisons"][pair.label] = {
            "treatment": pair.treatment, "baseline": pair.baseline,
            "gap": cluster_bootstrap_ci(diff.mean(1), docs, a.bootstrap),
            "gap_per_position": [cluster_bootstrap_ci(diff[:, t], docs, a.bootstrap) for t in range(diff.shape[1])]}
    return out


@torch.no_grad()
def score_start(a: AnalysisConfig, task: TextTask, model: torch.nn.Module, device: torch.device) -> dict:
    """The arms' starting model on the analysis windows (and the long windows, if any): its per-window
    losses (for the arms' paired ``vs_start``) and its summary for results.json (``start_loss``)."""
    model.eval().to(device)
    losses, docs = [], []
    for logps, y, doc in heldout_log_probs(task, {"start": model}, device, a.heldout_windows or None):
        losses.append(-logps["start"].gather(-1, y.unsqueeze(-1)).squeeze(-1).double().cpu())
        docs.append(doc)
    per_window, doc_ids = torch.cat(losses).numpy(), torch.cat(docs).numpy()
    summary = {"loss": cluster_bootstrap_ci(per_window.mean(1), doc_ids, a.bootstrap),
               "per_position": per_window.mean(0).tolist()}
    if a.long_window:
        long, _ = long_window_losses(task, {"start model": model}, device, a.long_window, a.long_window_count)
        summary["long_window_per_position"] = long["start model"].mean(0).tolist()
    return {"per_window": per_window, "summary": summary}


def heldout_log_probs(task: TextTask, models: dict, device: torch.device, limit: int | None):
    """Every model on the analysis windows (``task.heldout_all``, the same whatever the seed), batch by
    batch: yields ``({name: log-probabilities (B, T, V)}, targets, document ids)``."""
    for x, y, doc in task.heldout_all(64, limit):
        x = x.to(device)
        yield {name: F.log_softmax(m(x).float(), dim=-1) for name, m in models.items()}, y.to(device), doc


def _keep_top_kl(top: list, k: int, lb: torch.Tensor, lt: torch.Tensor, window: int) -> None:
    """Push this batch's largest KL(baseline || treatment) positions into the min-heap ``top`` (size ``k``)."""
    kl = (lb.exp() * (lb - lt)).sum(-1)
    values, flat = kl.flatten().topk(min(k, kl.numel()))  # this batch's candidates
    for value, i in zip(values.tolist(), flat.tolist()):
        w, t = divmod(i, kl.shape[1])
        item = (value, window + w, t, int(lb[w, t].argmax()), int(lt[w, t].argmax()))
        if len(top) < k:
            heapq.heappush(top, item)
        elif value > top[0][0]:
            heapq.heapreplace(top, item)


@torch.no_grad()
def first_position_losses(task: TextTask, models: dict, device: torch.device, limit: int,
                          batch_size: int = 4096) -> tuple[dict, np.ndarray]:
    """Each model's loss at position 0 for held-out token pairs (x_i, x_{i+1}) inside a document:
    ``({name: losses}, document ids)``. ``limit`` > 0 takes that many pairs spread evenly."""
    off = task.heldout.doc_offsets
    starts = np.concatenate([np.arange(off[d], off[d + 1] - 1) for d in range(task.heldout.n_docs)])
    docs = np.concatenate([np.full(max(0, int(off[d + 1] - off[d]) - 1), d) for d in range(task.heldout.n_docs)])
    if 0 < limit < len(starts):
        pick = np.linspace(0, len(starts) - 1, limit).round().astype(np.int64)
        starts, docs = starts[pick], docs[pick]
    tokens = torch.from_numpy(task.heldout.tokens[np.stack([starts, starts + 1], 1)].astype(np.int64))
    losses = {name: [] for name in models}
    for i in range(0, len(tokens), batch_size):
        chunk = tokens[i:i + batch_size].to(device)
        for name, m in models.items():
            logits = m(chunk[:, :1])[:, 0].float()
            losses[name].append(F.cross_entropy(logits, chunk[:, 1], reduction="none").double().cpu())
    return {name: torch.cat(v).numpy() for name, v in losses.items()}, docs


def _kl_example(task: TextTask, limit, item) -> dict:
    value, w, t, top_b, top_t = item
    start = int(task.scored_windows(limit)[w, 0])
    tokens = task.heldout.tokens[start:start + t + 2].tolist()
    dec = task.tokenizer.decode
    return {"kl": value, "window": int(w), "position": int(t), "context": dec(tokens[max(0, t - 15):t + 1]),
            "next": dec(tokens[t + 1:t + 2]), "baseline_top1": dec([top_b]), "treatment_top1": dec([top_t])}


def probe_layers(chosen: list[int], n_streams: int, arm: str) -> list[int]:
    """The residual streams to probe (``analysis.probe_layers``; empty = all ``n_streams``)."""
    bad = [l for l in chosen if not 0 <= l < n_streams]
    if bad:
        raise ConfigError(f"analysis.probe_layers={chosen}: arm {arm!r} has residual streams 0..{n_streams - 1} "
                          f"(0 = the embeddings); drop {bad}")
    return sorted(set(chosen)) if chosen else list(range(n_streams))


def token_classes(task: TextTask, n_classes: int) -> torch.Tensor:
    """Token id -> probe class: the ``n_classes - 1`` most frequent training tokens (in the first 2M),
    then one class 'other' for every other token."""
    counts = np.bincount(np.asarray(task.train.tokens[: 2_000_000], dtype=np.int64), minlength=task.tokenizer.vocab_size)
    top_tokens = np.argsort(-counts)[: n_classes - 1]
    lookup = np.full(task.tokenizer.vocab_size, n_classes - 1, dtype=np.int64)
    lookup[top_tokens] = np.arange(len(top_tokens))
    return torch.from_numpy(lookup)


def probes(a: AnalysisConfig, task: TextTask, models: dict, device: torch.device) -> dict:
    """Linear probes: from layer l's state at t, the token at t+k (top classes + 'other'); held-out
    accuracy of each of ``models`` ({arm name: model})."""
    lookup_t = token_classes(task, a.probe_classes)
    T, C = task.seq_len, a.probe_classes
    offsets = [k for k in a.probe_offsets if 0 < k < T]

    def batches(split):
        if split == "train":
            for i in range(0, a.probe_train_windows, 64):
                x, y = task.train_batch(10**7 + i, 0, min(64, a.probe_train_windows - i))
                yield x, y
        else:
            for x, y, _ in task.heldout_all(64, a.heldout_windows or None):
                yield x, y

    def targets(x, y, k):
        seq = torch.cat([x, y[:, -1:]], dim=1)  # tokens 0..T
        return lookup_t[seq[:, k:T + 1]]  # class of the token at t+k for t = 0..T-k

    result: dict = {"offsets": offsets, "classes": C}
    for name, model in models.items():
        model.eval().to(device)
        stats: dict = {}
        for x, y in batches("train"):
            _, hidden = model(x.to(device), return_hidden_states=True)
            if not stats:  # one probe per chosen residual stream the model returns (any family's width)
                layers = probe_layers(a.probe_layers, len(hidden), name)
                stats = {(l, k): ProbeStats(hidden[0].shape[-1], C) for l in layers for k in offsets}
            for k in offsets:
                onehot = F.one_hot(targets(x, y, k), C).double()
                for l in layers:
                    stats[(l, k)].add(hidden[l][:, : T + 1 - k].float().cpu(), onehot)
        fits = {key: s.fit(1e-3) for key, s in stats.items()}
        correct = {key: 0 for key in stats}
        total = {k: 0 for k in offsets}
        class_counts = {k: torch.zeros(C, dtype=torch.long) for k in offsets}
        for x, y in batches("heldout"):
            _, hidden = model(x.to(device), return_hidden_states=True)
            for k in offsets:
                tgt = targets(x, y, k)
                total[k] += tgt.numel()
                class_counts[k] += torch.bincount(tgt.flatten(), minlength=C)
                for l in layers:
                    pred = fits[(l, k)].predict(hidden[l][:, : T + 1 - k].float().cpu()).argmax(-1)
                    correct[(l, k)] += int((pred == tgt).sum())
        result["layers"] = layers
        result[name] = [[correct[(l, k)] / total[k] for k in offsets] for l in layers]
        result["majority_class_accuracy"] = [int(class_counts[k].max()) / total[k] for k in offsets]
    return result


def combine_seeds(per_seed: dict[str, dict]) -> dict:
    """Top-level results from every seed's analysis. One seed: its own numbers, with intervals from
    resampling held-out documents (evaluation noise only). Several seeds: means over seeds with
    Student-t intervals over the seeds, which include run-to-run training variance (at the ``cpu``
    scale it is far larger than the evaluation noise: docs/lm.md). Top-KL tokens and probes are
    the first seed's."""
    runs = list(per_seed.values())
    first = runs[0]
    if len(runs) == 1:
        out = dict(first)
        out["ci_over"] = "documents"
    else:
        out = {"heldout": first["heldout"], "ci_over": "seeds"}
        out["arms"] = {name: {"loss": mean_ci([r["arms"][name]["loss"]["mean"] for r in runs]),
                              "per_position": np.mean([r["arms"][name]["per_position"] for r in runs], 0).tolist()}
                       for name in first["arms"]}
        out["comparisons"] = {}
        for label, c in first["comparisons"].items():
            cs = [r["comparisons"][label] for r in runs]
            combined = {"treatment": c["treatment"], "baseline": c["baseline"]}
            for key in _SCALARS:
                if key in c:
                    combined[key] = mean_ci([x[key]["mean"] for x in cs])
            combined["gap_per_position"] = [mean_ci([x["gap_per_position"][t]["mean"] for x in cs])
                                            for t in range(len(c["gap_per_position"]))]
            if "top_kl" in c:
                combined["top_kl"] = c["top_kl"]
            out["comparisons"][label] = combined
        if "layer_sums" in first:
            out["layer_sums"] = {label: {**{k: v for k, v in g.items() if k not in LAYER_SCALARS},
                                         **{k: mean_ci([r["layer_sums"][label][k]["mean"] for r in runs])
                                            for k in LAYER_SCALARS}}
                                 for label, g in first["layer_sums"].items()}
        if "local_myopia_bonus" in first:
            out["local_myopia_bonus"] = mean_ci([r["local_myopia_bonus"]["mean"] for r in runs])
        if "probes" in first:
            out["probes"] = first["probes"]
        if "vs_start" in first:
            out["vs_start"] = {name: mean_ci([r["vs_start"][name]["mean"] for r in runs]) for name in first["vs_start"]}
        if "long_window" in first:
            lw = first["long_window"]
            out["long_window"] = {
                **{k: lw[k] for k in ("length", "windows", "documents", "tokens")},
                "arms": {name: np.mean([r["long_window"]["arms"][name] for r in runs], 0).tolist() for name in lw["arms"]},
                "comparisons": {label: {"treatment": c["treatment"], "baseline": c["baseline"],
                                        "gap": mean_ci([r["long_window"]["comparisons"][label]["gap"]["mean"] for r in runs]),
                                        "gap_per_position": [mean_ci([r["long_window"]["comparisons"][label]
                                                                      ["gap_per_position"][t]["mean"] for r in runs])
                                                             for t in range(len(c["gap_per_position"]))]}
                                for label, c in lw["comparisons"].items()}}
    out["per_seed"] = {
        seed: {"arms": {n: a["loss"] for n, a in r["arms"].items()},
               "comparisons": {label: {k: c[k] for k in (*_SCALARS, "gap_per_position") if k in c}
                               for label, c in r["comparisons"].items()},
               **({"local_myopia_bonus": r["local_myopia_bonus"]} if "local_myopia_bonus" in r else {}),
               **({"layer_sums": r["layer_sums"]} if "layer_sums" in r else {}),
               **({"vs_start": r["vs_start"]} if "vs_start" in r else {}),
               **({"long_window_gap": {label: c["gap"] for label, c in r["long_window"]["comparisons"].items()}}
                  if "long_window" in r else {})}
        for seed, r in per_seed.items()}
    return out


__all__ = ["analyse", "check_context", "combine_seeds", "first_position_losses", "heldout_log_probs",
           "long_window_analysis", "long_window_losses", "model_context", "probe_layers", "probes", "score_start",
           "token_classes"]
