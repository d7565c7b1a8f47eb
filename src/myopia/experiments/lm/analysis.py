"""``myopia lm``'s held-out analysis: every arm scored on the same windows, every (treatment,
baseline) pair compared (paired gap, by position, at position 0, largest-KL tokens, future-token
probes), and the seeds' analyses combined.

One model at a time: :func:`score_model` passes over the analysis windows once per model (the
losses come from the model's fused head and loss, :mod:`myopia.models.token_loss`, so no
vocabulary-wide logits are kept), and leaves behind small arrays (:class:`ModelScores`) and, for the
largest-KL tokens, the log-probabilities of a few windows in a file; :func:`compare` then works from
those alone. The experiment scores each arm right after training it and drops the model, so at
most one model is resident while the analysis runs (a 135M-parameter model holds 0.5 GB of
float32 weights; every arm at once held 17 GiB in ``smollm2-where-cpu``).
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from dataclasses import dataclass

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

SCORE_BATCH = 64
"""Windows per forward pass when scoring (4,096 tokens of 64-token windows)."""


@dataclass
class ModelScores:
    """One model's pass over the analysis windows: per-window losses ``(N, T)`` and their documents,
    and where asked, the position-0 losses, the long windows' losses, the probes' accuracies and the
    file holding the largest-KL windows' log-probabilities."""

    per_window: np.ndarray
    docs: np.ndarray
    first: np.ndarray | None = None
    first_docs: np.ndarray | None = None
    long: np.ndarray | None = None
    long_docs: np.ndarray | None = None
    probes: dict | None = None
    log_probs: str | None = None


    def save(self, path: str, key: str) -> None:
        """Write the scores to ``path`` (an .npz, atomically), under ``key`` (what they were computed
        from): a resumed run reads them back instead of scoring the arm again (:meth:`load`)."""
        arrays = {name: value for name, value in self.__dict__.items() if isinstance(value, np.ndarray)}
        write_keyed(path, key, {"probes": self.probes, "log_probs": self.log_probs}, arrays)

    @classmethod
    def load(cls, path: str, key: str) -> "ModelScores | None":
        """The scores :meth:`save` wrote under the same ``key``, or None (none, stale or unreadable)."""
        found = read_keyed(path, key)
        if found is None:
            return None
        meta, arrays = found
        log_probs = meta.get("log_probs")
        return cls(**arrays, probes=meta.get("probes"),
                   log_probs=log_probs if log_probs and os.path.isfile(log_probs) else None)


def write_keyed(path: str, key: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Arrays and JSON metadata in one .npz, written atomically under ``key`` (what they were
    computed from; :func:`scores_key`), for :func:`read_keyed`."""
    import json

    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, meta=np.array(json.dumps({**meta, "key": key})), **arrays)
    os.replace(tmp, path)


def read_keyed(path: str, key: str) -> tuple[dict, dict[str, np.ndarray]] | None:
    """``(metadata, arrays)`` that :func:`write_keyed` wrote under the same ``key``; None if the file
    is missing, unreadable or was written under another key (a stale cache)."""
    import json

    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("key") != key:
                return None
            return meta, {name: data[name] for name in data.files if name != "meta"}
    except (OSError, ValueError, KeyError):
        return None


def scores_key(*parts) -> str:
    """A digest of what a model's scores depend on (the analysis settings, the plan, the model's
    checkpoint step, the data): cached scores are used only under the same key."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ScoringPlan:
    """What :func:`score_model` measures besides the per-window losses."""

    first_position: bool = False
    long_window: bool = False
    probes: bool = False
    kl_dir: str | None = None
    """Write the largest-KL windows' log-probabilities here (None: not a KL pair's arm)."""


def plan_for(a: AnalysisConfig, name: str, pairs: list[Pair], full: bool, probe_arms: set[str] | None,
             kl_dir: str | None) -> ScoringPlan:
    """What ``name`` needs for the comparisons of ``pairs`` (``full``: also KL tokens and probes)."""
    paired = {n for pair in pairs for n in (pair.baseline, pair.treatment)}
    is_paired = name in paired
    return ScoringPlan(
        first_position=bool(pairs) and is_paired and a.first_position_tokens >= 0,
        long_window=bool(a.long_window) and (is_paired or not pairs),
        probes=full and is_paired and bool(a.probe_offsets) and (probe_arms is None or name in probe_arms),
        kl_dir=kl_dir if full and a.top_kl and is_paired else None)


@torch.no_grad()
def score_model(a: AnalysisConfig, task: TextTask, name: str, model: torch.nn.Module, device: torch.device,
                plan: ScoringPlan = ScoringPlan()) -> ModelScores:
    """``model`` on the analysis windows (``analysis.heldout_windows`` of them, spread evenly; the
    same whatever the seed) and on what ``plan`` adds; the model is needed for nothing afterwards."""
    model.eval().to(device)
    fits = fit_probes(a, task, name, model, device) if plan.probes else None
    losses, docs = [], []
    probe_counts = ProbeCounts(a, task, fits) if fits else None
    # with probes every residual stream of a batch is kept (31 x 4,096 x 576 floats for SmolLM2 at 64
    # windows): a quarter of the batch then
    for x, y, doc in task.heldout_all(SCORE_BATCH // 4 if fits else SCORE_BATCH, a.heldout_windows or None):
        x, y = x.to(device), y.to(device)
        if probe_counts is not None:
            loss, hidden = model(x, targets=y, return_hidden_states=True)
            probe_counts.add(x.cpu(), y.cpu(), hidden)
        else:
            loss = model(x, targets=y)
        losses.append(loss.double().cpu())
        docs.append(doc)
    scores = ModelScores(per_window=torch.cat(losses).numpy(), docs=torch.cat(docs).numpy())
    if probe_counts is not None:
        scores.probes = probe_counts.result(name)
    if plan.first_position:
        first, first_docs = first_position_losses(task, {name: model}, device, a.first_position_tokens)
        scores.first, scores.first_docs = first[name], first_docs
    if plan.long_window:
        long, long_docs = long_window_losses(task, {name: model}, device, a.long_window, a.long_window_count)
        scores.long, scores.long_docs = long[name], long_docs
    if plan.kl_dir is not None:
        scores.log_probs = store_log_probs(a, task, name, model, device, plan.kl_dir)
    return scores


def kl_rows(a: AnalysisConfig, task: TextTask) -> np.ndarray:
    """Indices (into the analysis windows) of the ``analysis.top_kl_windows`` windows searched for the
    largest-KL tokens, spread evenly over all of them."""
    n = len(task.scored_windows(a.heldout_windows or None))
    k = min(n, a.top_kl_windows) if a.top_kl_windows else n
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


@torch.no_grad()
def store_log_probs(a: AnalysisConfig, task: TextTask, name: str, model: torch.nn.Module, device: torch.device,
                    folder: str, batch: int = 2) -> str:
    """``model``'s float32 log-probabilities at every position of the KL windows (:func:`kl_rows`),
    written to a raw file in ``folder`` (windows × T × vocabulary; 0.8 GB for 64 windows of SmolLM2),
    batch by batch with plain writes (a memory map's pages would count as the process's memory): the
    largest-KL search then needs no two models at once."""
    rows = task.scored_windows(a.heldout_windows or None)[kl_rows(a, task)]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name.replace(os.sep, '_')}.f32")
    with open(path, "wb") as f:
        for i in range(0, len(rows), batch):
            x, _ = task._gather(task.heldout.tokens, rows[i:i + batch, 0])
            f.write(F.log_softmax(model(x.to(device)).float(), dim=-1).cpu().numpy().tobytes())
    return path


def _read_windows(path: str, first: int, count: int, T: int, V: int) -> torch.Tensor:
    """Windows ``first``.. (``count`` of them) of a :func:`store_log_probs` file, read into memory."""
    with open(path, "rb") as f:
        f.seek(first * T * V * 4)
        data = np.fromfile(f, dtype=np.float32, count=count * T * V)
    return torch.from_numpy(data.reshape(-1, T, V))


def top_kl(a: AnalysisConfig, task: TextTask, baseline: str, treatment: str, batch: int = 1) -> list[dict]:
    """The ``analysis.top_kl`` positions of the KL windows with the largest KL(baseline || treatment),
    from the two arms' stored log-probabilities, read a few windows at a time."""
    rows = kl_rows(a, task)
    T = task.seq_len
    V = os.path.getsize(baseline) // (4 * T * len(rows))
    top: list = []
    for i in range(0, len(rows), batch):
        n = min(batch, len(rows) - i)
        lb, lt = _read_windows(baseline, i, n, T, V), _read_windows(treatment, i, n, T, V)
        _keep_top_kl(top, a.top_kl, lb, lt, i, rows)
    return [_kl_example(task, a.heldout_windows or None, item) for item in sorted(top, reverse=True)]


def compare(a: AnalysisConfig, task: TextTask, scores: dict[str, ModelScores], pairs: list[Pair] | None = None,
            full: bool = True, start: dict | None = None, cuts: dict[str, Cut] | None = None) -> dict:
    """One seed's analysis (intervals over documents) from every model's :class:`ModelScores`: each
    arm's loss, and for every pair (default: each arm against vanilla) its paired gap, by position,
    at position 0 and over long windows; ``full``: also the largest-KL tokens and the probes.
    ``start`` (:func:`score_start`): the starting model's scores on the same windows, against which each
    arm's loss is compared (``vs_start``: arm − start, paired). ``cuts`` ({arm name: its cut}) finds the
    per-layer cuts whose gaps are summed (:func:`~myopia.experiments.lm.cuts.layer_groups`)."""
    pairs = default_pairs(list(scores)) if pairs is None else pairs
    per_window = {name: s.per_window for name, s in scores.items()}
    doc_ids = next(iter(scores.values())).docs
    out: dict = {"heldout": {"windows": len(doc_ids), "documents": len(np.unique(doc_ids)),
                             "tokens": int(per_window[next(iter(per_window))].size)}}
    out["arms"] = {name: {"loss": cluster_bootstrap_ci(arr.mean(1), doc_ids, a.bootstrap),
                          "per_position": arr.mean(0).tolist()} for name, arr in per_window.items()}
    comparisons = {}
    for pair in pairs:
        diff = per_window[pair.treatment] - per_window[pair.baseline]
        c = {"treatment": pair.treatment, "baseline": pair.baseline,
             "gap": cluster_bootstrap_ci(diff.mean(1), doc_ids, a.bootstrap),
             "gap_per_position": [cluster_bootstrap_ci(diff[:, t], doc_ids, a.bootstrap) for t in range(diff.shape[1])]}
        tb = scores[pair.treatment], scores[pair.baseline]
        if tb[0].first is not None and tb[1].first is not None:
            c["first_position_gap"] = cluster_bootstrap_ci(tb[0].first - tb[1].first, tb[0].first_docs, a.bootstrap)
        if full:
            files = tb[1].log_probs, tb[0].log_probs
            c["top_kl"] = top_kl(a, task, *files) if a.top_kl and None not in files else []
        comparisons[pair.label] = c
    out["comparisons"] = comparisons
    groups = layer_groups(pairs, cuts or {})
    if groups:
        out["layer_sums"] = layer_sums(groups, per_window, doc_ids, a.bootstrap)
    probed = {name: s.probes for name, s in scores.items() if s.probes is not None}
    if full and probed:
        first = next(iter(probed.values()))
        out["probes"] = {k: first[k] for k in ("offsets", "classes", "layers", "majority_class_accuracy")}
        out["probes"].update({name: p["accuracy"] for name, p in probed.items()})
    if {"vanilla", LOCAL_ARM} <= set(scores):
        bonus = per_window["vanilla"] - per_window[LOCAL_ARM]
        out["local_myopia_bonus"] = cluster_bootstrap_ci(bonus.mean(1), doc_ids, a.bootstrap)
    if start is not None:
        out["vs_start"] = {name: cluster_bootstrap_ci((arr - start["per_window"]).mean(1), doc_ids, a.bootstrap)
                           for name, arr in per_window.items()}
    long = {name: s for name, s in scores.items() if s.long is not None}
    if a.long_window and long:
        out["long_window"] = long_window_analysis(a, {n: s.long for n, s in long.items()},
                                                  next(iter(long.values())).long_docs, pairs)
    return out


def analyse(a: AnalysisConfig, task: TextTask, models: dict, device: torch.device, pairs: list[Pair] | None = None,
            full: bool = True, probe_arms: set[str] | None = None, start: dict | None = None,
            cuts: dict[str, Cut] | None = None) -> dict:
    """:func:`compare` of :func:`score_model` for each of ``models`` ({arm name: model}), one after
    another (the experiment scores each arm as it finishes training instead, never holding two)."""
    pairs = default_pairs(list(models)) if pairs is None else pairs
    with tempfile.TemporaryDirectory(prefix="myopia-kl-") as kl_dir:
        scores = {name: score_model(a, task, name, m, device, plan_for(a, name, pairs, full, probe_arms, kl_dir))
                  for name, m in models.items()}
        return compare(a, task, scores, pairs, full=full, start=start, cuts=cuts)


def drop_log_probs(scores: dict[str, ModelScores]) -> None:
    """Delete the largest-KL log-probability files of ``scores`` (and their folder when empty)."""
    for s in scores.values():
        if s.log_probs and os.path.exists(s.log_probs):
            os.remove(s.log_probs)
            folder = os.path.dirname(s.log_probs)
            if not os.listdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
        s.log_probs = None


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
            losses[name].append(m(w[:, :-1], targets=w[:, 1:]).double().cpu())
    return {name: torch.cat(v).numpy() for name, v in losses.items()}, rows[:, 1]


def long_window_analysis(a: AnalysisConfig, per_window: dict[str, np.ndarray], docs: np.ndarray,
                         pairs: list[Pair]) -> dict:
    """Loss and paired gap by position over ``analysis.long_window``-token windows (the paper's
    Pythia-2.8B curve, R12, used 256), intervals over documents, from each model's long-window losses."""
    out = {"length": a.long_window, "windows": len(docs), "documents": len(np.unique(docs)),
           "tokens": int(len(docs) * a.long_window),
           "arms": {name: arr.mean(0).tolist() for name, arr in per_window.items()}, "comparisons": {}}
    for pair in pairs:
        if pair.treatment not in per_window or pair.baseline not in per_window:
            continue
        diff = per_window[pair.treatment] - per_window[pair.baseline]
        out["comparisons"][pair.label] = {
            "treatment": pair.treatment, "baseline": pair.baseline,
            "gap": cluster_bootstrap_ci(diff.mean(1), docs, a.bootstrap),
            "gap_per_position": [cluster_bootstrap_ci(diff[:, t], docs, a.bootstrap) for t in range(diff.shape[1])]}
    return out


def score_start(a: AnalysisConfig, task: TextTask, model: torch.nn.Module, device: torch.device) -> dict:
    """The arms' starting model on the analysis windows (and the long windows, if any), once per run:
    :func:`start_summary` of its :func:`score_model`."""
    return start_summary(a, score_model(a, task, "start model", model, device, start_plan(a)))


def start_plan(a: AnalysisConfig) -> ScoringPlan:
    return ScoringPlan(long_window=bool(a.long_window))


def start_summary(a: AnalysisConfig, scores: ModelScores) -> dict:
    """The start model's per-window losses (for the arms' paired ``vs_start``) and its summary for
    results.json (``start_loss``)."""
    summary = {"loss": cluster_bootstrap_ci(scores.per_window.mean(1), scores.docs, a.bootstrap),
               "per_position": scores.per_window.mean(0).tolist()}
    if scores.long is not None:
        summary["long_window_per_position"] = scores.long.mean(0).tolist()
    return {"per_window": scores.per_window, "summary": summary}


def _keep_top_kl(top: list, k: int, lb: torch.Tensor, lt: torch.Tensor, first: int, rows: np.ndarray) -> None:
    """Push the largest KL(baseline || treatment) positions of windows ``first``... (log-probabilities
    ``(windows, T, V)``; ``rows[i]``: the analysis window of KL window i) into the min-heap ``top``."""
    kl = (lb.exp() * (lb - lt)).sum(-1)
    values, flat = kl.flatten().topk(min(k, kl.numel()))  # this batch's candidates
    for value, i in zip(values.tolist(), flat.tolist()):
        w, t = divmod(i, kl.shape[1])
        item = (value, int(rows[first + w]), t, int(lb[w, t].argmax()), int(lt[w, t].argmax()))
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
            losses[name].append(m(chunk[:, :1], targets=chunk[:, 1:])[:, 0].double().cpu())
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


def _probe_targets(lookup: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int, T: int) -> torch.Tensor:
    seq = torch.cat([x, y[:, -1:]], dim=1)  # tokens 0..T
    return lookup[seq[:, k:T + 1]]  # class of the token at t+k for t = 0..T-k


def fit_probes(a: AnalysisConfig, task: TextTask, name: str, model: torch.nn.Module, device: torch.device) -> dict:
    """Linear probes from each chosen residual stream's state at t to the class of the token at t+k
    (``analysis.probe_classes``: the most frequent tokens and 'other'), fitted on
    ``analysis.probe_train_windows`` training windows: ``{(layer, k): RidgeFit}``."""
    lookup = token_classes(task, a.probe_classes)
    T, C = task.seq_len, a.probe_classes
    offsets = [k for k in a.probe_offsets if 0 < k < T]
    stats: dict = {}
    step = SCORE_BATCH // 4  # every residual stream of the batch is kept
    for i in range(0, a.probe_train_windows, step):
        x, y = task.train_batch(10**7 + i, 0, min(step, a.probe_train_windows - i))
        _, hidden = model(x.to(device), targets=y.to(device), return_hidden_states=True)
        if not stats:  # one probe per chosen residual stream the model returns (any family's width)
            layers = probe_layers(a.probe_layers, len(hidden), name)
            stats = {(l, k): ProbeStats(hidden[0].shape[-1], C) for l in layers for k in offsets}
        for k in offsets:
            onehot = F.one_hot(_probe_targets(lookup, x, y, k, T), C).double()
            for l in sorted({l for l, _ in stats}):
                stats[(l, k)].add(hidden[l][:, : T + 1 - k].float().cpu(), onehot)
    return {key: s.fit(1e-3) for key, s in stats.items()}


class ProbeCounts:
    """Held-out accuracy of fitted probes (:func:`fit_probes`), counted batch by batch during the
    scoring pass (the same forward that gives the losses)."""

    def __init__(self, a: AnalysisConfig, task: TextTask, fits: dict):
        self.fits, self.T, self.C = fits, task.seq_len, a.probe_classes
        self.lookup = token_classes(task, a.probe_classes)
        self.offsets = sorted({k for _, k in fits})
        self.layers = sorted({l for l, _ in fits})
        self.correct = dict.fromkeys(fits, 0)
        self.total = dict.fromkeys(self.offsets, 0)
        self.class_counts = {k: torch.zeros(self.C, dtype=torch.long) for k in self.offsets}

    def add(self, x: torch.Tensor, y: torch.Tensor, hidden: list[torch.Tensor]) -> None:
        for k in self.offsets:
            tgt = _probe_targets(self.lookup, x, y, k, self.T)
            self.total[k] += tgt.numel()
            self.class_counts[k] += torch.bincount(tgt.flatten(), minlength=self.C)
            for l in self.layers:
                pred = self.fits[(l, k)].predict(hidden[l][:, : self.T + 1 - k].float().cpu()).argmax(-1)
                self.correct[(l, k)] += int((pred == tgt).sum())

    def result(self, name: str) -> dict:
        return {"offsets": self.offsets, "classes": self.C, "layers": self.layers,
                "accuracy": [[self.correct[(l, k)] / self.total[k] for k in self.offsets] for l in self.layers],
                "majority_class_accuracy": [int(self.class_counts[k].max()) / self.total[k] for k in self.offsets]}


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


__all__ = ["SCORE_BATCH", "ModelScores", "read_keyed", "scores_key", "write_keyed", "ProbeCounts", "ScoringPlan", "analyse", "check_context", "combine_seeds",
           "compare", "drop_log_probs", "first_position_losses", "fit_probes", "kl_rows", "long_window_analysis",
           "long_window_losses", "model_context", "plan_for", "probe_layers", "score_model", "score_start",
           "start_plan", "start_summary", "store_log_probs", "top_kl",
           "token_classes"]
