"""One ``myopia lm`` run at one window length: the starting model, every seed's arms trained,
analysed and combined, then results.json, report.md and plots. (The context sweep,
:mod:`~myopia.experiments.lm.context`, calls it once per window length.)"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import torch

from myopia.attention.cut import VANILLA
from myopia.config import ConfigError, to_dict
from myopia.experiments.lm import decodability, steps
from myopia.experiments.lm.analysis import (
    ModelScores,
    combine_seeds,
    compare,
    drop_log_probs,
    plan_for,
    score_model,
    scores_key,
    start_plan,
    start_summary,
    store_log_probs,
)
from myopia.experiments.lm.config import PAPER, LMExperiment
from myopia.experiments.lm.cuts import horizon_curves
from myopia.experiments.lm.features import future_token_probes
from myopia.experiments.lm.report import summary_text, write_report
from myopia.models.hf.lora import with_lora
from myopia.models.hf.presets import HF_PRESETS, build_hf_model
from myopia.models.local import LocalMyopicGPT
from myopia.runs import feature_attribution, gradient_geometry
from myopia.runs.arms import LOCAL_ARM, Arm, build_model, load_model, parse_arms
from myopia.runs.pairs import PAPER_PAIR, parse_pairs
from myopia.runs.results import Results, Status, publish, recording, set_stage
from myopia.runs.runner import run_arms
from myopia.tasks.text import TextTask
from myopia.train.config import TrainConfig
from myopia.train.layout import pretrain_dir, seed_dir
from myopia.train.loop import resolve_device
from myopia.train.precision import autocast_for, describe


def run_single(cfg: LMExperiment, *, block_size: int | None = None) -> dict:
    """The experiment at ``cfg.data.seq_len``; ``block_size`` (the context sweep's) sizes the model's
    context beyond the window, so that runs at several window lengths train the same model."""
    arms = parse_arms(cfg.arms, allow_local=True)
    check_attribution(cfg)
    pairs = parse_pairs(cfg.analysis.pairs, [a.name for a in arms], "analysis.pairs")
    probe_arms = {a.name for a in arms if not a.cut.changes_forward}  # a bigram state sees one token
    cuts = {a.name: a.cut for a in arms if not a.local}
    seeds = cfg.seed_list()
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {cfg.seeds} repeats a seed; give distinct seeds, e.g. --seeds 0,1,2")
    lens_seeds = lens_seed_list(cfg, seeds)
    device = resolve_device(cfg.train.device)
    base_task = TextTask(cfg.data.for_grad_accum(cfg.train.grad_accum), seeds[0])
    overrides = base_task.model_overrides()
    if block_size is not None:
        overrides["block_size"] = max(overrides["block_size"], block_size)
    if cfg.analysis.long_window > overrides["block_size"] and not cfg.hf_model and not cfg.init_from:
        raise ConfigError(f"analysis.long_window={cfg.analysis.long_window}: the model's context is "
                          f"{overrides['block_size']} tokens (data.seq_len); use --analysis.long_window "
                          f"{overrides['block_size']} or less")
    accum = f" ({cfg.train.grad_accum} micro-batches of {cfg.train.batch_size})" if cfg.train.grad_accum > 1 else ""
    print(f"myopia lm: {len(seeds)} seed(s) x {len(arms)} arms x {cfg.train.steps} steps of "
          f"{cfg.train.batch_size * cfg.train.grad_accum} x {cfg.data.seq_len} tokens{accum}; corpus {cfg.data.corpus}: "
          f"{len(base_task.train.tokens):,} training and {len(base_task.heldout.tokens):,} held-out tokens "
          f"({base_task.heldout.n_docs} held-out documents), tokenizer {base_task.tokenizer.name}", flush=True)
    precision = describe(device, cfg.train.precision)
    print(f"myopia lm: precision {precision['resolved']} ({precision['reason']})", flush=True)
    results = Results("lm", cfg, body={"paper": PAPER, "seeds": seeds, "training": {},
                                       "start": start_kind(cfg, len(seeds)), "precision": precision,
                                       "analysis_precision": precision["resolved"]})
    with recording(results, cfg.out):
        start = None
        if not cfg.pretrain.per_seed:
            start, pretraining = starting_model(cfg, base_task, overrides)
            if pretraining is not None:
                results["pretraining"] = pretraining["arms"].get("vanilla")
                if pretraining["status"] != Status.COMPLETED:
                    return results.write(cfg.out, Status(pretraining["status"]))
        scored_start = None
        if not cfg.pretrain.per_seed:  # the start all seeds share, on the analysis windows: scored once
            scored_start = shared_start_scores(cfg, base_task, overrides, start, device, precision["resolved"])
            if scored_start is not None:
                results["start_loss"] = scored_start["summary"]["loss"]
                results["start_model"] = scored_start["summary"]
        # future lens: the start model and the arms of future_lens.seeds (default the first seed's)
        lenses: dict[int, dict[str, dict]] = {seed: {} for seed in lens_seeds}
        lens_arms = {a.name for a in arms if not a.local and not a.cut.changes_forward}
        start_lens_result = None
        if cfg.future_lens.enabled and not cfg.pretrain.per_seed:
            start_lens_result = start_lens(cfg, base_task, overrides, start, device, precision["resolved"])
        per_seed: dict[str, dict] = {}
        for seed in seeds:
            task = base_task.with_seed(seed)
            if cfg.pretrain.per_seed:  # this seed's own pretrained start (pretraining variance in the intervals)
                start, pretraining = starting_model(cfg, base_task, overrides, seed=seed)
                results.body.setdefault("pretraining_per_seed", {})[str(seed)] = pretraining["arms"].get("vanilla")
                if pretraining["status"] != Status.COMPLETED:
                    return results.write(cfg.out, Status(pretraining["status"]))
            first_seed = seed == seeds[0]
            scores: dict[str, ModelScores] = {}
            kl_dir = os.path.join(seed_dir(cfg.out, seed), ".top-kl")

            def score(arm, model, result, scores=scores, task=task, first_seed=first_seed, kl_dir=kl_dir, seed=seed,
                      lens_here=lenses.get(seed)):
                # each arm is scored as soon as it is trained, then dropped: one model in memory at a time;
                # its scores are kept beside its checkpoints, so a resumed run does not score it again
                results["parameters"] = sum(p.numel() for p in model.parameters())
                plan = plan_for(cfg.analysis, arm.name, pairs, first_seed, probe_arms, kl_dir)
                cache = os.path.join(seed_dir(cfg.out, seed), arm.name, "scores.npz")
                key = scores_key(to_dict(cfg.analysis), plan, result.steps, to_dict(cfg.data), precision["resolved"])
                cached = ModelScores.load(cache, key)
                with autocast_for(device, cfg.train.precision):
                    if cached is None:
                        set_stage(f"scoring arm {arm.name} of seed {seed}")
                        cached = score_model(cfg.analysis, task, arm.name, model, device, plan)
                        cached.save(cache, key)
                    elif plan.kl_dir is not None and cached.log_probs is None:  # its KL file went with the run
                        cached.log_probs = store_log_probs(cfg.analysis, task, arm.name, model, device, plan.kl_dir)
                        cached.save(cache, key)
                scores[arm.name] = cached
                if lens_here is not None and arm.name in lens_arms:
                    set_stage(f"future lens of arm {arm.name} of seed {seed}")
                    with autocast_for(device, cfg.train.precision):
                        lens_here[arm.name] = decodability.measure(
                            cfg.future_lens, task, model, device,
                            os.path.join(seed_dir(cfg.out, seed), arm.name, "future_lens.npz"),
                            scores_key(decodability.key_settings(cfg.future_lens), result.steps, to_dict(cfg.data),
                                       precision["resolved"]))

            def make(arm, seed=seed, task=task):
                if arm.local:  # parse_arms put vanilla first; it is trained by now
                    if cfg.hf_model:
                        raise ConfigError(f"arms: {LOCAL_ARM} is implemented for myopia's GPT, not for hf_model")
                    return LocalMyopicGPT(load_model(os.path.join(seed_dir(cfg.out, seed), "vanilla"),
                                                     Arm(name="vanilla", cut=VANILLA), overrides))
                if start is not None:
                    return copy.deepcopy(start).set_attention(arm.cut)
                return fresh_model(cfg, arm, task, overrides, seed)

            train = replace(cfg.train, seed=seed)
            status = run_arms(seed_dir(cfg.out, seed), cfg, arms, task, make, cfg.optim, train,
                              resume=cfg.resume, on_arm_done=score,
                              monitor_for=monitors(cfg, task, train, first_seed=first_seed))
            results["training"][str(seed)] = status["arms"]
            if status["status"] != Status.COMPLETED:
                return results.write(cfg.out, Status(status["status"]))
            set_stage(f"comparing the arms of seed {seed}")
            per_seed[str(seed)] = compare(cfg.analysis, task, scores, pairs, full=first_seed,
                                          start=scored_start, cuts=cuts)
            drop_log_probs(scores)  # only once compared: a resumed run still finds them
        results.update(combine_seeds(per_seed))
        by_step = steps.gap_by_step(cfg.out, seeds, pairs,
                                    cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len)
        for label, rows in by_step.items():
            results["comparisons"][label]["by_step"] = rows
        main = PAPER_PAIR.label if PAPER_PAIR.label in by_step else next(iter(by_step), None)
        if main is not None:
            results["gap_by_step"] = by_step[main]
        checked = steps.first_step_check(cfg.out, seeds, pairs,
                                         {a.name for a in arms if not a.local and not a.cut.changes_forward})
        if checked:
            results["first_step_check"] = checked
        curves = horizon_curves(results["comparisons"], cuts, cfg.data.seq_len)
        if curves:
            results["horizon_curves"] = curves
        pretrained = pretrain_dir(cfg.out, seeds[0] if cfg.pretrain.per_seed else None)
        first_seed_arms = {f"seed {seeds[0]} {a.name}": os.path.join(seed_dir(cfg.out, seeds[0]), a.name) for a in arms}
        geometry = gradient_geometry.collect(
            {**({"pretraining": pretrained} if cfg.pretrain.steps and not cfg.init_from else {}), **first_seed_arms})
        if geometry is not None:
            results["gradient_geometry"] = geometry
        if start_lens_result is not None or any(lenses.values()):
            results[decodability.KEY] = decodability.gather(
                cfg.future_lens, lenses, [(p.treatment, p.baseline) for p in pairs], start=start_lens_result)
        attribution = feature_attribution.collect(first_seed_arms)
        if attribution is not None:
            results[feature_attribution.KEY] = attribution
        data = results.write(cfg.out, Status.COMPLETED)
    return publish(cfg.out, data, write_report, summary_text)


def shared_start_scores(cfg: LMExperiment, task: TextTask, overrides: dict, start, device, precision: str) -> dict | None:
    """The start model every seed shares, scored once per run (:func:`score_start`), and kept in
    ``<out>/start_scores.npz`` so that a resumed run does not score it again; None if the arms start
    from fresh weights."""
    if start is None and not pretrained_hf(cfg):
        return None
    cache = os.path.join(cfg.out, "start_scores.npz")
    key = scores_key(to_dict(cfg.analysis), "start", cfg.hf_model, cfg.init_from, to_dict(cfg.pretrain),
                     to_dict(cfg.data), precision)
    scores = ModelScores.load(cache, key)
    if scores is None:
        set_stage("scoring the start model")
        model = start if start is not None else pretrained_start(cfg, task=task, overrides=overrides)
        with autocast_for(device, cfg.train.precision):
            scores = score_model(cfg.analysis, task, "start model", model, device, start_plan(cfg.analysis))
        del model
        os.makedirs(cfg.out, exist_ok=True)
        scores.save(cache, key)
    return start_summary(cfg.analysis, scores)


def lens_seed_list(cfg: LMExperiment, seeds: list[int]) -> list[int]:
    """The seeds whose arms get a future lens: ``future_lens.seeds`` (default the first seed); none when
    the lens is off. A seed the run does not train is refused in one line."""
    if not cfg.future_lens.enabled:
        if cfg.future_lens.seeds:
            raise ConfigError(f"future_lens.seeds={cfg.future_lens.seeds} names seeds to measure, but the future lens "
                              "is off; add --future_lens.enabled true")
        return []
    wanted = list(dict.fromkeys(cfg.future_lens.seeds)) or seeds[:1]
    missing = [s for s in wanted if s not in seeds]
    if missing:
        raise ConfigError(f"future_lens.seeds={cfg.future_lens.seeds}: the run trains seeds {seeds}, not {missing}; "
                          f"name seeds among them (e.g. --future_lens.seeds {','.join(map(str, seeds))})")
    return [s for s in seeds if s in wanted]


def start_lens(cfg: LMExperiment, task: TextTask, overrides: dict, start, device, precision: str) -> dict | None:
    """The shared start model's future lens (kept in ``<out>/future_lens_start.npz``); None without a start."""
    if start is None and not pretrained_hf(cfg):
        return None
    cache = os.path.join(cfg.out, "future_lens_start.npz")
    key = scores_key(decodability.key_settings(cfg.future_lens), "start", cfg.hf_model, cfg.init_from,
                     to_dict(cfg.pretrain), to_dict(cfg.data), precision)
    found = decodability.load(cache, key)
    if found is not None:
        return found
    set_stage("future lens of the start model")
    model = start if start is not None else pretrained_start(cfg, task=task, overrides=overrides)
    os.makedirs(cfg.out, exist_ok=True)
    with autocast_for(device, cfg.train.precision):
        return decodability.measure(cfg.future_lens, task, model, device, cache, key)


def monitors(cfg: LMExperiment, task: TextTask, train: TrainConfig, first_seed: bool):
    """``monitor_for(arm, model)``: the arms' training monitors, reported for the first seed only: the
    gradient split and the per-feature attribution (future-token probes), where configured."""
    geometry = gradient_geometry.monitor_factory(task, cfg.analysis.gradient_split_batches if first_seed else 0, train,
                                                 cfg.analysis.gradient_split_groups)
    if not (first_seed and cfg.attribution.enabled):
        return geometry
    probes = future_token_probes(task, cfg.analysis.probe_offsets, cfg.analysis.probe_classes, cfg.attribution)
    return feature_attribution.merge_factories(
        geometry, feature_attribution.monitor_factory(task, cfg.attribution, train, probes, optim=cfg.optim))


def check_attribution(cfg: LMExperiment) -> None:
    """One-line errors, before anything trains, for attribution sites the windows or the model do not
    have, and for attribution without a future-token probe to score."""
    att = cfg.attribution
    if not att.enabled:
        return
    T = cfg.data.seq_len
    n_layer = None if cfg.hf_model or cfg.init_from else cfg.model.n_layer  # else checked once the model is built
    att.check_sites(n_layer, "model.n_layer", T, "data.seq_len")
    if not [k for k in cfg.analysis.probe_offsets if 0 < k < T]:
        raise ConfigError(f"attribution: analysis.probe_offsets={cfg.analysis.probe_offsets} has no offset k with "
                          f"0 < k < data.seq_len={T}; the attribution scores future-token probes (e.g. "
                          "--analysis.probe_offsets 1,2)")


def fresh_model(cfg: LMExperiment, arm: Arm, task: TextTask, overrides: dict, seed: int) -> torch.nn.Module:
    """The arm's model with the seed's initial weights: myopia's GPT or the ``hf_model``."""
    if cfg.hf_model:
        model = build_hf_model(cfg.hf_model, arm.cut, task.tokenizer.vocab_size, seed)
    else:
        model = build_model(cfg.model, arm, overrides, seed)
    return with_lora(model, cfg.lora)  # LoRA adapters when --lora.r > 0 (Hugging Face models)


def pretrained_hf(cfg: LMExperiment) -> bool:
    """Whether ``hf_model`` names pretrained weights (a checkpoint folder, hf:NAME, smollm2-135m) rather
    than a fresh-weight preset."""
    return bool(cfg.hf_model) and cfg.hf_model not in HF_PRESETS


def pretrained_start(cfg: LMExperiment, task: TextTask, overrides: dict) -> torch.nn.Module | None:
    """The pretrained ``hf_model`` every arm starts from (a checkpoint folder, hf:NAME or smollm2-135m),
    built as vanilla; None for fresh-weight presets."""
    if not pretrained_hf(cfg):
        return None
    return fresh_model(cfg, Arm(name="vanilla", cut=VANILLA), task, overrides, cfg.seed_list()[0])


def start_kind(cfg: LMExperiment, n_seeds: int) -> dict:
    """How the arms' starting models were made, and whether the intervals over seeds are conditional
    on one starting model (they then leave out the variance of pretraining)."""
    if cfg.init_from:
        kind = "init_from"
    elif pretrained_hf(cfg):
        kind = "pretrained_hf"
    elif cfg.pretrain.steps:
        kind = "pretrained_per_seed" if cfg.pretrain.per_seed else "pretrained_shared"
    else:
        kind = "fresh"
    return {"kind": kind,
            "conditional_on_one_start": n_seeds > 1 and kind in ("init_from", "pretrained_shared", "pretrained_hf")}


def starting_model(cfg: LMExperiment, task: TextTask, overrides: dict,
                   seed: int | None = None) -> tuple[torch.nn.Module | None, dict | None]:
    """The model every arm starts from, and the pretraining run's status if there was one: fresh
    weights (None), a trained GPT (``init_from``) or a vanilla model pretrained here for
    ``pretrain.steps`` in ``<out>/pretrain/vanilla`` (resumable like the arms). With ``seed`` (for
    ``pretrain.per_seed``): that seed's own start, pretrained with seed ``pretrain.seed + seed`` in
    ``<out>/pretrain/seed<N>/vanilla``."""
    if cfg.init_from and cfg.pretrain.steps:
        raise ConfigError("init_from and pretrain.steps both choose the arms' starting model; set only one")
    if cfg.pretrain.per_seed and not cfg.pretrain.steps:
        raise ConfigError("pretrain.per_seed pretrains a start per seed; set pretrain.steps > 0 too")
    vanilla = Arm(name="vanilla", cut=VANILLA)
    if cfg.pretrain.steps and pretrained_hf(cfg):
        raise ConfigError(f"pretrain.steps={cfg.pretrain.steps}: hf_model {cfg.hf_model!r} is pretrained already, and "
                          f"this would train it further at lr {cfg.pretrain.lr or cfg.optim.lr} before the arms (the "
                          "default --preset cpu does); pass --pretrain.steps 0, or --preset smollm2-cpu for SmolLM2")
    if cfg.init_from:
        if cfg.hf_model:
            raise ConfigError("init_from: takes a myopia GPT checkpoint; for a Hugging Face model pass its "
                              "checkpoint directory as --hf_model")
        return load_model(cfg.init_from, vanilla, overrides), None
    p = cfg.pretrain
    if not p.steps:
        return None, None

    kept: dict = {}
    pseed = p.seed if seed is None else p.seed + seed
    print(f"myopia lm: pretraining a vanilla model for {p.steps} steps (seed {pseed}); every arm "
          f"{'of this seed ' if seed is not None else ''}starts from it", flush=True)
    train = replace(cfg.train, steps=p.steps, seed=pseed)
    status = run_arms(os.path.dirname(pretrain_dir(cfg.out, seed)), cfg, [vanilla], task.with_seed(pseed),
                      lambda arm: fresh_model(cfg, arm, task, overrides, pseed),
                      replace(cfg.optim, lr=p.lr or cfg.optim.lr), train,
                      resume=cfg.resume, on_arm_done=lambda arm, model, result: kept.update(model=model),
                      monitor_for=gradient_geometry.monitor_factory(task, cfg.analysis.gradient_split_batches, train,
                                                                    cfg.analysis.gradient_split_groups))
    return kept.get("model"), status


__all__ = ["check_attribution", "fresh_model", "monitors", "pretrained_hf", "pretrained_start",
           "run_single", "start_kind", "starting_model"]
