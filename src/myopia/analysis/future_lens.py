"""What a model's hidden states know about later tokens: linear maps from a residual stream at t to
the model's final normalised state at t + k, decoded by the model's own unembedding (the simplest
method of Future Lens, Pal et al. 2023).

For each residual stream l (0 = the embeddings; -1 = the final normalised state itself) and offset k
(k tokens beyond the next: the state at t + k predicts the token at t + k + 1), a ridge regression
ẑ = (h_l(t) − mean) W + mean(z) is fitted in closed form on training-side windows, its strength chosen
on a held-back tenth of them (validation error of ẑ), and ẑ is decoded through the model's output head.
On held-out windows it is scored over the **full vocabulary**: top-1 and top-5 accuracy against the
true token at t + k + 1 and agreement (top-1) with the model's own prediction at t + k, with 95%
intervals from a bootstrap over held-out documents. Beside it, in the same positions:

- the ceiling: the model's own prediction at t + k, with the full context (top-1, top-5);
- the skip-bigram: the token at t + k + 1 predicted from the token at t alone, by its most frequent
  successors at that distance in the training tokens.

The map from the last stream to itself at k = 0 is the identity, and its decoded accuracy is then the
model's own next-token accuracy, to the bit (``tests/test_future_lens.py``): the decoder is the
model's own unembedding path.

    from myopia.analysis.future_lens import FutureLensConfig, future_lens
    result = future_lens(model, task, FutureLensConfig(layers=[0, 10, 20, 30]), device)
    result["maps"]["10"]["2"]["top1"]     # {"mean", "low", "high", ...}: stream 10, k = 2

``model`` is myopia's GPT or an :class:`~myopia.models.hf.presets.HFCausalLM` (any transformers causal
LM: ``HFCausalLM(model, name)``; a trained arm: :func:`myopia.interop.interp.hf_model`); ``task`` a
:class:`~myopia.tasks.text.TextTask`. ``myopia lm --future_lens.enabled true`` measures the start
model and the first seed's arms (``--future_lens.seeds``: those of several seeds, with intervals over
them) and reports them under ``future_lens`` (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from myopia.analysis.probes import ProbeStats
from myopia.analysis.stats import cluster_bootstrap_ci
from myopia.config import ConfigError

FINAL = -1
"""The stream index of the final normalised state (what the output head reads)."""


@dataclass
class FutureLensConfig:
    """Future-token decodability (Future Lens's linear map, decoded by the model's own head)."""

    enabled: bool = False
    """Measure it (myopia lm: on the start model and the first seed's arms; costs minutes per model)."""
    seeds: list[int] = field(default_factory=list)
    """myopia lm: the seeds whose arms are measured (empty = the first seed only). With several, the
    arms' accuracies and their paired differences also get t-intervals over these seeds."""
    layers: list[int] = field(default_factory=list)
    """Residual streams mapped from (0 = the embeddings, l = after block l, -1 = the final normalised
    state); empty = every stream of a model with at most 12 blocks, else every third and the last."""
    offsets: list[int] = field(default_factory=lambda: [1, 2, 3])
    """k: the map targets the final normalised state at t + k, which predicts the token at t + k + 1
    (k = 0: the next token, the model's own job)."""
    fit_tokens: int = 200_000
    """Training-side positions the maps are fitted on (a tenth of them choose the ridge strength)."""
    score_tokens: int = 50_000
    """Held-out positions scored (windows spread evenly over the held-out documents)."""
    ridges: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    """Ridge strengths tried, relative to the mean feature variance."""
    bootstrap: int = 1000
    """Bootstrap resamples of held-out documents for the intervals."""
    batch: int = 64
    """Windows per forward pass."""

    def __post_init__(self) -> None:
        if any(k < 0 for k in self.offsets):
            raise ValueError(f"future_lens.offsets={self.offsets} must be >= 0")
        if self.fit_tokens < 100 or self.score_tokens < 10:
            raise ValueError("future_lens: fit_tokens must be >= 100 and score_tokens >= 10")
        if not self.ridges or any(r < 0 for r in self.ridges):
            raise ValueError(f"future_lens.ridges={self.ridges} must be non-negative strengths")


def default_layers(n_blocks: int) -> list[int]:
    """Every stream 0..n_blocks for a model of at most 12 blocks; else every third and the last."""
    if n_blocks <= 12:
        return list(range(n_blocks + 1))
    return sorted({*range(0, n_blocks + 1, 3), n_blocks})


def streams_and_final(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residual streams of ``x`` (0 = the embeddings, l = after block l) and the final normalised
    state, from myopia's GPT or an HFCausalLM (``residual_streams``)."""
    if not hasattr(model, "residual_streams"):
        raise ConfigError(f"future lens: {type(model).__name__} has no residual_streams(x); pass myopia's GPT or "
                          "an HFCausalLM (myopia.models.hf.presets.HFCausalLM(transformers_model, name))")
    return model.residual_streams(x)


def _centred(stats: ProbeStats):
    """Means and centred second moments of a map's sufficient statistics."""
    mh, mz = stats.sum_h / stats.n, stats.sum_z / stats.n
    return mh, mz, stats.hh - stats.n * torch.outer(mh, mh), stats.hz - stats.n * torch.outer(mh, mz)


def _merged(a: ProbeStats, b: ProbeStats) -> ProbeStats:
    both = ProbeStats(a.hh.shape[0], a.hz.shape[1])
    for part in (a, b):
        both.n += part.n
        for name in ("sum_h", "sum_z", "hh", "hz", "zz"):
            getattr(both, name).add_(getattr(part, name))
    return both


@dataclass
class LensMap:
    """ẑ = (h − mean_h) @ weight + mean_z, fitted with ridge ``ridge`` (relative)."""

    weight: torch.Tensor
    mean_h: torch.Tensor
    mean_z: torch.Tensor
    ridge: float

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(h.dtype if h.dtype != torch.bfloat16 else torch.float32)
        return (h.to(w.dtype) - self.mean_h.to(w.dtype)) @ w + self.mean_z.to(w.dtype)


def _solve(fit: ProbeStats, held: ProbeStats, ridges: list[float]) -> LensMap:
    """The ridge map fitted on ``fit`` whose strength has the least squared error on ``held``, refitted
    on both."""
    mh, mz, chh, chz = _centred(fit)
    evals, evecs = torch.linalg.eigh(chh)
    scale = float(chh.diagonal().mean().clamp_min(1e-12))
    proj = evecs.T @ chz
    best = None
    for ridge in ridges:
        w = evecs @ (proj / (evals + ridge * scale).clamp_min(1e-12 * scale).unsqueeze(1))
        b = mz - mh @ w
        # held-out squared error from its sufficient statistics: Σ|z − hW − b|²
        sse = (float(held.zz.sum()) - 2 * float((held.hz * w).sum()) - 2 * float(held.sum_z @ b)
               + float(((held.hh @ w) * w).sum()) + 2 * float((held.sum_h @ w) @ b) + held.n * float(b @ b))
        if best is None or sse < best[0]:
            best = (sse, ridge)
    mh, mz, chh, chz = _centred(_merged(fit, held))
    scale = float(chh.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(chh.shape[0], dtype=torch.float64)
    weight = torch.linalg.solve(chh + best[1] * scale * eye, chz) if best[1] > 0 else torch.linalg.lstsq(chh, chz).solution
    return LensMap(weight=weight, mean_h=mh, mean_z=mz, ridge=best[1])


def _resolve_layers(cfg: FutureLensConfig, n_streams: int) -> list[int]:
    layers = cfg.layers or default_layers(n_streams - 1)
    bad = [l for l in layers if not (l == FINAL or 0 <= l < n_streams)]
    if bad:
        raise ConfigError(f"future_lens.layers={cfg.layers}: the model has residual streams 0..{n_streams - 1} "
                          f"(and {FINAL} for the final normalised state); drop {bad}")
    return sorted(set(layers), key=lambda l: n_streams if l == FINAL else l)


def _windows(task, first_step: int, n_windows: int, batch: int):
    """Training-side windows (a stream of its own, a pure function of the step): ``(x, y)`` batches."""
    for i in range(0, n_windows, batch):
        yield task.train_batch(first_step + i, 0, min(batch, n_windows - i))


_FIT_STEP = 3 * 10**7  # training-side windows of their own (the probes use 10**7 and 2·10**7 on)


@torch.no_grad()
def fit_maps(model: nn.Module, task, cfg: FutureLensConfig, device: torch.device) -> tuple[dict, list[int]]:
    """``({(layer, k): LensMap}, layers)`` fitted on ``cfg.fit_tokens`` training-side positions."""
    T = task.seq_len
    offsets = [k for k in cfg.offsets if k < T]
    if not offsets:
        raise ConfigError(f"future_lens.offsets={cfg.offsets}: every k must be below the window length {T}")
    per_window = T - max(offsets)
    n_windows = max(2, -(-cfg.fit_tokens // per_window))
    n_val = max(1, n_windows // 10)
    stats: dict = {}
    layers: list[int] = []
    model.eval().to(device)
    seen = 0
    for x, y in _windows(task, _FIT_STEP, n_windows, cfg.batch):
        streams, z = streams_and_final(model, x.to(device))
        if not layers:
            layers = _resolve_layers(cfg, len(streams))
            d_out = z.shape[-1]
            stats = {(l, k, part): ProbeStats(streams[0].shape[-1] if l != FINAL else d_out, d_out)
                     for l in layers for k in offsets for part in ("fit", "held")}
        part_of = ["held" if seen + i >= n_windows - n_val else "fit" for i in range(x.shape[0])]
        seen += x.shape[0]
        for part in ("fit", "held"):
            rows = [i for i, p in enumerate(part_of) if p == part]
            if not rows:
                continue
            zr = z[rows].float().cpu()
            for l in layers:
                h = (z if l == FINAL else streams[l])[rows].float().cpu()
                for k in offsets:
                    stats[(l, k, part)].add(h[:, : T - k], zr[:, k:])
    maps = {(l, k): _solve(stats[(l, k, "fit")], stats[(l, k, "held")], cfg.ridges) for l in layers for k in offsets}
    return maps, layers


def _topk_ids(z: torch.Tensor, head: nn.Linear, k: int = 5, rows: int = 512) -> torch.Tensor:
    """The ``k`` most likely token ids (over the whole vocabulary) of the states ``z`` (N, d) decoded by
    ``head``, a chunk of rows at a time (no N × V tensor)."""
    out = []
    w = head.weight
    for s in range(0, z.shape[0], rows):
        logits = z[s:s + rows].to(w.dtype) @ w.T
        if head.bias is not None:
            logits = logits + head.bias
        out.append(logits.float().topk(k, dim=-1).indices)
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def _output_head(model: nn.Module) -> nn.Linear:
    head = model.output_head() if hasattr(model, "output_head") else None
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"future lens: {type(model).__name__} has no linear output head to decode with")
    return head


@torch.no_grad()
def score_maps(model: nn.Module, task, maps: dict, layers: list[int], cfg: FutureLensConfig,
               device: torch.device) -> dict:
    """Per-position correctness on ``cfg.score_tokens`` held-out positions: ``{"docs": (N,), ("map", l, k,
    "top1"|"top5"|"agree"): bool (N,), ("ceiling", k, "top1"|"top5"): ..., ("tokens", k): (N,) the token
    at t + k + 1, ("current", k): (N,) the token at t}`` (each k its own positions t)."""
    T = task.seq_len
    offsets = sorted({k for _, k in maps})
    n_windows = max(1, -(-cfg.score_tokens // (T - max(offsets))))
    head = _output_head(model)
    out: dict = {}

    def put(key, value):
        out.setdefault(key, []).append(value)

    model.eval().to(device)
    for x, y, doc in task.heldout_all(cfg.batch, n_windows):
        x, y = x.to(device), y.to(device)
        streams, z = streams_and_final(model, x)
        B = x.shape[0]
        own = _topk_ids(z.reshape(B * T, -1), head).reshape(B, T, -1).cpu()  # the model's own top-5 at each t
        yc, xc = y.cpu(), x.cpu()
        for k in offsets:
            target = yc[:, k:]  # the token at t + k + 1, for t = 0 .. T-1-k
            put(("tokens", k), target.reshape(-1))
            put(("current", k), xc[:, : T - k].reshape(-1))
            put(("docs", k), doc.unsqueeze(1).expand(B, T - k).reshape(-1))
            own_k = own[:, k:]
            put(("ceiling", k, "top1"), (own_k[..., 0] == target).reshape(-1))
            put(("ceiling", k, "top5"), (own_k == target.unsqueeze(-1)).any(-1).reshape(-1))
            for l in layers:
                h = (z if l == FINAL else streams[l])[:, : T - k]
                pred = _topk_ids(maps[(l, k)](h.reshape(-1, h.shape[-1])), head).reshape(B, T - k, -1).cpu()
                put(("map", l, k, "top1"), (pred[..., 0] == target).reshape(-1))
                put(("map", l, k, "top5"), (pred == target.unsqueeze(-1)).any(-1).reshape(-1))
                put(("map", l, k, "agree"), (pred[..., 0] == own_k[..., 0]).reshape(-1))
    return {key: torch.cat(v).numpy() for key, v in out.items()}


def skip_bigram(task, offsets: list[int], max_tokens: int = 5_000_000) -> dict[int, np.ndarray]:
    """``{k: (vocabulary, 5) ids}``: for every token, its 5 most frequent successors k + 1 tokens later
    in the training tokens (within documents; tokens never seen first get the most frequent tokens)."""
    tokens = np.asarray(task.train.tokens[:max_tokens], dtype=np.int64)
    off = np.asarray(task.train.doc_offsets, dtype=np.int64)
    doc_of = np.searchsorted(off, np.arange(len(tokens)), side="right") - 1
    V = task.tokenizer.vocab_size
    frequent = np.argsort(-np.bincount(tokens, minlength=V))[:5]
    tables = {}
    for k in offsets:
        d = k + 1
        a, b = tokens[:-d], tokens[d:]
        same = doc_of[:-d] == doc_of[d:]
        keys, counts = np.unique(a[same] * V + b[same], return_counts=True)
        first, second = keys // V, keys % V
        order = np.lexsort((-counts, first))  # by first token, then by count, largest first
        first, second = first[order], second[order]
        table = np.tile(frequent, (V, 1))
        starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
        ends = np.r_[starts[1:], len(first)]
        for s, e in zip(starts, ends):
            top = second[s:min(e, s + 5)]
            table[first[s], : len(top)] = top
            if len(top) < 5:  # pad with frequent tokens not already there
                fill = [t for t in frequent if t not in top][: 5 - len(top)]
                table[first[s], len(top):] = fill
        tables[k] = table
    return tables


def summarise(scored: dict, layers: list[int], maps: dict, cfg: FutureLensConfig, bigram: dict | None) -> dict:
    """The results dict (``results.json``'s ``future_lens`` entry for one model) with bootstrap intervals."""
    offsets = sorted({k for _, k in maps})
    out: dict = {"layers": layers, "offsets": offsets, "maps": {}, "ceiling": {}, "skip_bigram": {},
                 "ridge": {str(l): {str(k): maps[(l, k)].ridge for k in offsets} for l in layers},
                 "positions": {str(k): int(len(scored[("docs", k)])) for k in offsets},
                 "documents": int(len(np.unique(scored[("docs", offsets[0])])))}

    def ci(values, k):
        return cluster_bootstrap_ci(values.astype(np.float64), scored[("docs", k)], cfg.bootstrap)

    for l in layers:
        out["maps"][str(l)] = {str(k): {m: ci(scored[("map", l, k, m)], k) for m in ("top1", "top5", "agree")}
                               for k in offsets}
    for k in offsets:
        out["ceiling"][str(k)] = {m: ci(scored[("ceiling", k, m)], k) for m in ("top1", "top5")}
        if bigram is not None:
            pred = bigram[k][scored[("current", k)]]
            target = scored[("tokens", k)]
            out["skip_bigram"][str(k)] = {"top1": ci(pred[:, 0] == target, k),
                                          "top5": ci((pred == target[:, None]).any(1), k)}
    return out


def future_lens(model: nn.Module, task, cfg: FutureLensConfig | None = None, device: torch.device | str = "cpu",
                keep_positions: bool = False) -> dict:
    """Fit and score the future lens of ``model`` on ``task`` (see the module's docstring); with
    ``keep_positions`` the per-position correctness arrays come back too (``"positions_scored"``), for
    paired comparisons between models on the same positions (:func:`paired_difference`)."""
    cfg = cfg or FutureLensConfig()
    device = torch.device(device)
    maps, layers = fit_maps(model, task, cfg, device)
    scored = score_maps(model, task, maps, layers, cfg, device)
    result = summarise(scored, layers, maps, cfg, skip_bigram(task, sorted({k for _, k in maps})))
    result["fit_tokens"] = cfg.fit_tokens
    if keep_positions:
        result["positions_scored"] = scored
    return result


def paired_difference(a: dict, b: dict, cfg: FutureLensConfig, metric: str = "top1") -> dict:
    """``a − b`` (two :func:`future_lens` results with ``keep_positions``, on the same positions) for every
    stream and offset, each with a paired bootstrap interval over documents."""
    sa, sb = a["positions_scored"], b["positions_scored"]
    missing = [l for l in a["layers"] if l not in b["layers"]] + [k for k in a["offsets"] if k not in b["offsets"]]
    if missing:
        raise ValueError(f"paired_difference: the second result has no maps for stream/offset {missing}; measure both "
                         "models with the same FutureLensConfig layers and offsets")
    for k in a["offsets"]:
        if not (np.array_equal(sa[("docs", k)], sb[("docs", k)]) and np.array_equal(sa[("tokens", k)], sb[("tokens", k)])):
            raise ValueError(f"paired_difference: the two results were scored on different held-out positions (k={k}); "
                             "pair only models measured on the same task, held-out data and score_tokens")
    out = {}
    for l in a["layers"]:
        out[str(l)] = {}
        for k in a["offsets"]:
            diff = sa[("map", l, k, metric)].astype(np.float64) - sb[("map", l, k, metric)].astype(np.float64)
            out[str(l)][str(k)] = cluster_bootstrap_ci(diff, sa[("docs", k)], cfg.bootstrap)
    return out


__all__ = ["FINAL", "FutureLensConfig", "LensMap", "default_layers", "fit_maps", "future_lens",
           "paired_difference", "score_maps", "skip_bigram", "streams_and_final", "summarise"]
