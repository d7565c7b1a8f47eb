"""``myopia synthetic``: the paper's synthetic pre-caching experiment (§4), end to end.

For every seed and condition (the task at each p, plus the shift-0 *breadcrumbs* control) the arms
are trained under identical data, optimiser, schedule and seed; then each model is evaluated on fresh
held-out sequences and probed: every layer's residual stream at position n against f(x_{n-k}),
k = 0..K, and against control targets sin(c·x_n) at other frequencies, each beside the same probe on
the untrained model (same architecture and seed), since random features already make f(x_n) partly
decodable. Writes ``results.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace

import torch

from myopia.analysis.probes import ProbeStats
from myopia.analysis.stats import mean_ci
from myopia.attention.cut import Cut
from myopia.experiments.synthetic import horizon, report
from myopia.experiments.synthetic.config import PAPER, ProbeConfig, SyntheticExperiment, conditions
from myopia.experiments.synthetic.features import fx_probes
from myopia.runs import feature_attribution, gradient_geometry
from myopia.runs.arms import Arm, build_model
from myopia.runs.grid import Cell, arm_folders, paired_runs, runs_by_arm, train_grid
from myopia.runs.pairs import Pair, parse_pairs
from myopia.runs.results import Results, Status, publish, recording
from myopia.tasks.base import PROBE_STREAM, batch_generator
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask, generate
from myopia.train.loop import resolve_device


def task_trivial_loss(task: SyntheticConfig, seed: int) -> float:
    """Zero-predictor Huber loss on the task's own positions (z = 1): the paper's 1.2569 at window 10."""
    return SyntheticTask(replace(task, p=1.0), seed).trivial_loss(n_batches=16, batch_size=512)


@torch.no_grad()
def probe_model(model: torch.nn.Module, task: SyntheticConfig, cfg: ProbeConfig, seed: int,
                device: torch.device) -> dict:
    """Held-out centred R² per layer for f(x_{n-k}) (k = 0..K) and control frequencies at k = 0."""
    model.eval()
    K = max(0, min(cfg.lookbacks, task.seq_len - 8))
    n_layers = len(model.blocks) + 1
    n_targets = K + 1 + len(cfg.control_frequencies)
    stats = {split: [ProbeStats(model.config.n_embd, n_targets) for _ in range(n_layers)] for split in ("train", "test")}
    batch = 256
    for split, n_seq, offset in (("train", cfg.train_sequences, 0), ("test", cfg.test_sequences, 10**6)):
        for i in range((n_seq + batch - 1) // batch):
            inp, _, x = generate(task, batch, batch_generator(seed, PROBE_STREAM, offset + i))
            _, hidden = model(inp.to(device), return_hidden_states=True)
            T = x.shape[1]
            fx = task.feature(x)
            targets = [fx[:, K - k: T - k] for k in range(K + 1)]
            targets += [torch.sin(c * x[:, K:]) for c in cfg.control_frequencies]
            z = torch.stack(targets, dim=-1)
            for layer, h in enumerate(hidden):
                stats[split][layer].add(h[:, K:].float().cpu(), z)
    r2 = [stats["test"][l].r2(stats["train"][l].fit(cfg.ridge)).tolist() for l in range(n_layers)]
    model.train()
    return {
        "lookbacks": list(range(K + 1)),
        "r2": [row[: K + 1] for row in r2],
        "control_frequencies": list(cfg.control_frequencies),
        "control_r2": [row[K + 1:] for row in r2],
    }


def layer1_r2(probe: dict) -> float:
    """The probe's held-out R² for f(x_n) after block 0 (layer 1, lookback 0): the number the
    experiment's verdicts read; NaN for a probe with no block."""
    return probe["r2"][1][0] if len(probe["r2"]) > 1 else float("nan")


def estimate_seconds_per_step(cfg: SyntheticExperiment, task: SyntheticConfig, device: torch.device) -> float:
    """Time a few myopic training steps of the configured model (for the up-front duration estimate)."""
    from myopia.train.loop import autocast_for

    tsk = SyntheticTask(task, 0)
    model = build_model(cfg.model, Arm("myopic", Cut("myopic")), tsk.model_overrides(), 0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(9):  # the first steps pay for allocation and kernel set-up: time the last six
        x, y = tsk.train_batch(step, 0, cfg.train.batch_size)
        t = time.perf_counter()
        with autocast_for(device, cfg.train.precision):
            loss = tsk.loss_per_position(model(x.to(device)), y.to(device)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = sorted(times[3:])
    return steady[len(steady) // 2] * cfg.train.grad_accum


def run(cfg: SyntheticExperiment) -> dict:
    conds = conditions(cfg)
    check_attribution(cfg)
    pairs = parse_pairs(cfg.pairs, [a.name for a in conds[0].arms], "pairs")
    device = resolve_device(cfg.train.device)
    n_arms = len(cfg.seeds) * sum(len(c.arms) for c in conds)
    per_step = estimate_seconds_per_step(cfg, conds[0].task, device)
    total_min = n_arms * cfg.train.steps * per_step / 60
    print(f"myopia synthetic: {n_arms} arm runs x {cfg.train.steps} steps, ~{per_step * 1e3:.0f} ms/step on "
          f"{device.type}: about {total_min:.0f} min in all (plus probes). Results print as each arm finishes.",
          flush=True)
    os.makedirs(cfg.out, exist_ok=True)
    results = Results("synthetic", cfg, body={
        "paper": {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in PAPER.items()},
        "conditions": {}})
    with recording(results, cfg.out):
        for cond in conds:
            trivial = task_trivial_loss(cond.task, 10**6 + 7)
            results["conditions"][cond.label] = {"task": asdict(cond.task), "control": cond.control,
                                                 "trivial_loss": trivial, "runs": {}}

        def scorer(cell: Cell):
            return _scorer(cfg, results["conditions"][cell.condition.label], cell, device)

        def monitor(cell: Cell):
            geometry = gradient_geometry.monitor_factory(cell.task, cfg.gradient_split_batches, cell.train)
            if not cfg.attribution.enabled or cell.seed != cfg.seeds[0]:  # reported for the first seed only
                return geometry
            probes = fx_probes(cell.condition.task, cfg.attribution, cfg.probe.ridge, cell.seed)
            return feature_attribution.merge_factories(
                geometry,
                feature_attribution.monitor_factory(cell.task, cfg.attribution, cell.train, probes, optim=cfg.optim))

        if not train_grid(cfg, results, conds, scorer, monitor):
            return results.write(cfg.out, Status.INTERRUPTED)
        results["summary"] = summarise(results.body)
        results["did_not_learn"] = report.did_not_learn(results.body)
        results["comparisons"] = compare(results.body, pairs)
        grid = horizon.horizon_grid(results.body, {a.name: a.cut for a in conds[0].arms})
        if grid is not None:
            results["horizon_grid"] = grid
        geometry = gradient_geometry.collect(arm_folders(cfg.out, cfg.seeds[0], conds))
        if geometry is not None:
            results["gradient_geometry"] = geometry
        attribution = feature_attribution.collect(arm_folders(cfg.out, cfg.seeds[0], conds))
        if attribution is not None:
            results[feature_attribution.KEY] = attribution
        data = results.write(cfg.out, Status.COMPLETED)
    return publish(cfg.out, data, report.write, report.summary_text)


def check_attribution(cfg: SyntheticExperiment) -> None:
    """One-line errors for attribution sites the model or the task does not have."""
    cfg.attribution.check_sites(cfg.model.n_layer, "model.n_layer", cfg.task.seq_len, "task.seq_len")


def _scorer(cfg: SyntheticExperiment, entry: dict, cell: Cell, device: torch.device):
    """Each trained arm of one condition and seed: its held-out loss against the condition's trivial
    loss (``entry``), and the probes of the trained model beside the same probes of the untrained one."""
    cond, seed, overrides = cell.condition, cell.seed, cell.task.model_overrides()

    def score(arm, model, result) -> dict:
        loss = result.eval["loss"]
        normalised = loss / cond.task.p
        probes = probe_model(model, cond.task, cfg.probe, seed, device)
        untrained = build_model(cfg.model, arm, overrides, seed).to(device)
        probes_untrained = probe_model(untrained, cond.task, cfg.probe, seed, device)
        r2, r2u = layer1_r2(probes), layer1_r2(probes_untrained)
        print(f"  -> {cond.label} seed {seed} {arm.name}: normalised loss {normalised:.4f} "
              f"({normalised / entry['trivial_loss']:.3f} x trivial); layer-1 R² for f(x_n) "
              f"{r2:.3f} (untrained {r2u:.3f})", flush=True)
        return {"eval_loss": loss, "normalised_loss": normalised, "ratio_to_trivial": normalised / entry["trivial_loss"],
                "per_position_loss": result.eval["per_position"], "train_seconds": result.seconds,
                "steps": result.steps, "probe": probes, "probe_untrained": probes_untrained}

    return score


def summarise(results: dict) -> dict:
    """Mean and 95% CI over seeds for each condition and arm."""
    summary: dict = {}
    for label, entry in results["conditions"].items():
        by_arm = runs_by_arm(entry)
        for arm in sorted(by_arm):
            runs = by_arm[arm]
            r2 = [layer1_r2(r["probe"]) for r in runs]
            r2u = [layer1_r2(r["probe_untrained"]) for r in runs]
            summary.setdefault(label, {})[arm] = {
                "normalised_loss": mean_ci([r["normalised_loss"] for r in runs]),
                "ratio_to_trivial": mean_ci([r["ratio_to_trivial"] for r in runs]),
                "r2_layer1_fx": mean_ci(r2),
                "r2_layer1_fx_untrained": mean_ci(r2u),
                "r2_layer1_fx_gain": mean_ci([a - b for a, b in zip(r2, r2u)]),
                "seeds": len(runs),
            }
    return summary


def compare(results: dict, pairs: list[Pair]) -> dict:
    """Per condition and pair (both arms trained there): the treatment's ratio to trivial and layer-1 R²
    gain minus the baseline's, seed by seed, with a 95% t-interval over seeds."""
    out: dict = {}
    for label, entry in results["conditions"].items():
        for pair in pairs:
            runs = paired_runs(entry, pair)
            if not runs:
                continue

            def gain(r):
                return layer1_r2(r["probe"]) - layer1_r2(r["probe_untrained"])

            t, b = pair.treatment, pair.baseline
            out.setdefault(label, {})[pair.label] = {
                "treatment": t, "baseline": b,
                "ratio_to_trivial": mean_ci([r[t]["ratio_to_trivial"] - r[b]["ratio_to_trivial"] for r in runs]),
                "r2_layer1_fx_gain": mean_ci([gain(r[t]) - gain(r[b]) for r in runs]),
                "seeds": len(runs),
            }
    return out


__all__ = ["check_attribution", "compare", "estimate_seconds_per_step", "layer1_r2", "probe_model", "run", "summarise",
           "task_trivial_loss"]
