"""``myopia reproduce``: the laptop-scale reproduction of the paper's headline results.

Runs the synthetic experiment's ``cpu`` preset with its shift-0 breadcrumbs control (paper §4), then
the language-modelling experiment's ``cpu`` preset (vanilla, myopic and bigram on the built-in
corpus, paper §4.1), and writes a combined ``report.md``. Each result prints as soon as
its arm finishes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from myopia.analysis.stats import format_ci
from myopia.config import from_dict, merge
from myopia.experiments import lm, synthetic
from myopia.experiments.synthetic import report as synthetic_report
from myopia.runs.pairs import PAPER_PAIR
from myopia.runs.results import Results, Status, recording, write_report


@dataclass
class ReproduceConfig:
    """Laptop-scale reproduction of the paper's headline results."""

    out: str = "runs/reproduce"
    """Run directory; each experiment writes into a sub-folder."""
    seeds: list[int] = field(default_factory=list)
    """Seeds for every experiment (empty = each preset's own: seed 0). With several, intervals are over seeds."""
    resume: bool = False
    """Continue an interrupted reproduction."""
    synthetic_steps: int | None = None
    """Override the synthetic cpu preset's step count (None = the preset's)."""
    language: bool = True
    """Also run the natural-language myopia gap (the lm cpu preset, ~12 minutes on 2 cores)."""
    lm_steps: int | None = None
    """Override the lm cpu preset's fine-tuning steps per arm (None = the preset's)."""
    progress: bool = True
    """Show progress bars."""


def run(cfg: ReproduceConfig) -> dict:
    """Run the stages; ``results.json`` records each stage's status and where its own results are."""
    parts = 2 if cfg.language else 1
    seeds = {"seeds": list(cfg.seeds)} if cfg.seeds else {}
    overrides: dict = {"out": os.path.join(cfg.out, "synthetic"), **seeds, "resume": cfg.resume,
                       "train": {"progress": cfg.progress}}
    if cfg.synthetic_steps is not None:
        overrides["train"]["steps"] = cfg.synthetic_steps
    syn_cfg = from_dict(synthetic.SyntheticExperiment, merge(synthetic.PRESETS["cpu"], overrides))
    results = Results("reproduce", cfg, body={"stages": {}})
    stages = results["stages"]
    os.makedirs(cfg.out, exist_ok=True)
    with recording(results, cfg.out):
        print(f"== 1/{parts} synthetic pre-caching task (paper §4), with the shift-0 breadcrumbs control ==", flush=True)
        res = synthetic.run(syn_cfg)
        stages["synthetic"] = {"status": res["status"], "results": "synthetic/results.json"}
        if res["status"] != Status.COMPLETED:
            return results.write(cfg.out, Status(res["status"]))  # Ctrl-C: stop here; --resume continues
        lines = ["# myopia: laptop-scale reproduction of Wu, Morris & Levine (2024)", "",
                 "- [Synthetic pre-caching task (§4)](synthetic/report.md): " + _synthetic_line(res)]
        if cfg.language:
            lm_over: dict = {"out": os.path.join(cfg.out, "lm"), **seeds, "resume": cfg.resume,
                             "train": {"progress": cfg.progress}}
            if cfg.lm_steps is not None:
                lm_over["train"]["steps"] = cfg.lm_steps
            lm_cfg = from_dict(lm.LMExperiment, merge(lm.PRESETS["cpu"], lm_over))
            print(f"== 2/{parts} natural-language myopia gap (paper §4.1) on the built-in corpus ==", flush=True)
            res = lm.run(lm_cfg)
            stages["lm"] = {"status": res["status"], "results": "lm/results.json"}
            if res["status"] != Status.COMPLETED:
                return results.write(cfg.out, Status(res["status"]))
            line = "- [Natural-language myopia gap (§4.1)](lm/report.md)"
            c = res.get("comparisons", {}).get(PAPER_PAIR.label)
            if c is not None:
                line += (f": gap {format_ci(c['gap'])} nats (paper, GPT-2 124M: {lm.paper_number('gap')}); "
                         f"at position 0 {format_ci(c.get('first_position_gap', c['gap_per_position'][0]))} "
                         f"(paper: {lm.paper_number('position0_gap')}); 95% CI {lm.ci_text(len(res['seeds']))}")
            lines.append(line)
        data = results.write(cfg.out, Status.COMPLETED)
    write_report(cfg.out, lines)
    print(f"reproduction report: {os.path.join(cfg.out, 'report.md')}")
    return data


def _synthetic_line(res: dict) -> str:
    """Headline numbers of the synthetic experiment, and its one-sentence conclusion."""
    parts = []
    for label, arms in res.get("summary", {}).items():
        cond = res["conditions"][label]
        name = "shift-0 control" if cond["control"] else f"shift {cond['task']['shift']}, p = {cond['task']['p']:g}"
        for arm, s in arms.items():
            parts.append(f"{arm} ({name}) {format_ci(s['ratio_to_trivial'])}× trivial, layer-1 R² for f(x_n) "
                         f"{format_ci(s['r2_layer1_fx'])} (untrained {format_ci(s['r2_layer1_fx_untrained'])})")
    failed = synthetic_report.failure_line(res)
    return (failed + " " if failed else "") + "; ".join(parts) + ". " + synthetic_report.conclusion(res)
