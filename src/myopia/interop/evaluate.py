"""``myopia eval``: zero-shot benchmarks with EleutherAI's lm-evaluation-harness on every arm of a run.

Each path is a run folder (every arm of every seed), an arm or checkpoint folder (exported to a
temporary transformers checkpoint with :mod:`myopia.interop.export`), or a transformers checkpoint folder
(``config.json``). Every model goes through the harness's own Hugging Face model (``hf``) and
``lm_eval.simple_evaluate``; ``results.json`` and ``report.md`` hold the harness's numbers unchanged
(each metric with its standard error) and, per task and arm, the *paired* difference to the
baseline arm (vanilla) of the same seed: from the per-item scores the harness logs
(``log_samples``), d_i = score_arm(i) − score_baseline(i) over the items both scored, reported as
mean(d) ± sd(d)/√n. Pairing removes the between-item variance the two unpaired standard errors
both carry, so it is much narrower when the arms agree on most items.

Default tasks are the paper's (LAMBADA, PIQA, SciQ, ARC-Easy; they download from the Hugging Face
hub). Offline, give a local task: the package ships ``myopia_example`` (40 multiple-choice items,
``--tasks myopia_example``), and ``--task_dir`` adds a folder of your own task YAMLs.
Needs the optional extra: ``pip install 'myopia[eval]'``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources

from myopia.config import ConfigError
from myopia.train import layout

PAPER_TASKS = ["lambada_openai", "piqa", "sciq", "arc_easy"]
PYTHIA_SIZES = ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b"]
# The paper's zero-shot accuracies (acc), vanilla and myopic Pythia fine-tunes, read from its figures
# (±0.01; ../shared/reference/paper.md, item R11), in the order of PYTHIA_SIZES.
PAPER_ZERO_SHOT = {
    "lambada_openai": ([.057, .104, .193, .281, .428, .471, .542, .587], [.018, .073, .135, .213, .294, .351, .380, .398]),
    "piqa": ([.553, .572, .610, .631, .676, .699, .711, .744], [.547, .578, .600, .627, .646, .677, .673, .696]),
    "sciq": ([.518, .590, .671, .765, .825, .865, .886, .895], [.517, .551, .657, .743, .786, .818, .848, .823]),
    "arc_easy": ([.321, .356, .387, .458, .525, .562, .609, .647], [.320, .355, .390, .436, .491, .527, .549, .559]),
    "arc_challenge": ([.176, .176, .180, .190, .216, .242, .261, .297], [.178, .167, .185, .202, .200, .219, .230, .248]),
    "winogrande": ([.502, .477, .522, .514, .535, .524, .569, .608], [.488, .490, .521, .514, .521, .520, .532, .567]),
}
INSTALL = "pip install 'myopia[eval]' (lm-eval==0.4.13)"


@dataclass
class EvalConfig:
    """Zero-shot benchmarks (lm-evaluation-harness) on every arm of runs, or on checkpoints."""

    paths: list[str] = field(default_factory=list)
    """Runs (every arm of every seed), arm or checkpoint folders, or transformers checkpoint folders."""
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))
    """lm-eval task names (default: the paper's, from the hub); offline: myopia_example or --task_dir's."""
    task_dir: str = ""
    """A folder of your own lm-eval task YAMLs (local JSONL data works offline)."""
    out: str = "runs/eval"
    """Where results.json and report.md go."""
    num_fewshot: int = 0
    """Examples in each prompt (0 = zero-shot, as the paper)."""
    limit: int = 0
    """Items per task (0 = all)."""
    batch_size: int = 16
    """The harness's batch size."""
    device: str = "cpu"
    """cpu | cuda | cuda:N."""
    baseline: str = "vanilla"
    """The arm the paired differences are taken against (within each seed)."""

    def __post_init__(self) -> None:
        for name in ("num_fewshot", "limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"myopia eval needs lm-evaluation-harness: {INSTALL}") from None
    return lm_eval, TaskManager


def builtin_task_dir(dest: str) -> str:
    """The shipped example task(s), copied to ``dest`` with their data paths made absolute."""
    os.makedirs(dest, exist_ok=True)
    src = resources.files("myopia.data").joinpath("eval_tasks")
    with resources.as_file(src) as folder:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.endswith(".jsonl"):
                shutil.copy(path, os.path.join(dest, name))
        for name in os.listdir(folder):
            if name.endswith(".yaml"):
                with open(os.path.join(folder, name)) as f:
                    text = f.read().replace("__HERE__", dest)
                with open(os.path.join(dest, name), "w") as f:
                    f.write(text)
    return dest


def discover(paths: list[str]) -> list[tuple[str, str]]:
    """``(label, path)`` of every model to evaluate. Labels of run arms are ``[seedN/]arm``."""
    found: list[tuple[str, str]] = []
    for path in paths:
        path = path.rstrip("/")
        if not os.path.isdir(path):
            raise ConfigError(f"eval: {path!r} is not a folder (a run, an arm, a checkpoint or a transformers "
                              "checkpoint)")
        if os.path.isfile(os.path.join(path, "config.json")) or layout.is_arm_dir(path) \
                or os.path.isfile(os.path.join(path, "state.json")):
            found.append((os.path.basename(path), path))
            continue
        seeds = layout.seed_folders(path)
        for prefix, folder in ([(f"{s}/", os.path.join(path, s)) for s in seeds] or [("", path)]):
            arms = layout.arm_dirs(folder)
            found += [(f"{prefix}{a}", os.path.join(folder, a)) for a in arms]
    if not found:
        raise ConfigError(f"eval: found no arm or checkpoint in {paths}")
    labels = [label for label, _ in found]
    if len(set(labels)) != len(labels):
        found = [(f"{os.path.basename(os.path.dirname(p))}/{label}", p) for label, p in found]
    return found


def as_checkpoint(path: str, tmp: str) -> str:
    """A transformers checkpoint folder for ``path`` (exported to ``tmp`` unless it is one)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from myopia.interop.export import export

    out = os.path.join(tmp, f"model{len(os.listdir(tmp))}")
    return export(path, out)


def evaluate_checkpoint(path: str, cfg: EvalConfig, task_manager) -> dict:
    """``lm_eval.simple_evaluate`` with the harness's ``hf`` model on one checkpoint folder."""
    lm_eval, _ = _lm_eval()
    model_args = {"pretrained": path, "dtype": "float32"}
    prefix = prefix_token(path)
    if prefix is not None:
        model_args["prefix_token_id"] = prefix
    return lm_eval.simple_evaluate(
        model="hf", model_args=model_args,
        tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size,
        limit=cfg.limit or None, log_samples=True, task_manager=task_manager, device=cfg.device)


def prefix_token(path: str) -> int | None:
    """The harness starts empty contexts with the tokenizer's BOS/EOS token. myopia's trained BPEs
    have no special tokens (their models never saw one), so the newline token stands in (None when
    the tokenizer has its own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.bos_token_id is not None or tok.eos_token_id is not None:
        return None
    ids = tok("\n", add_special_tokens=False)["input_ids"]
    return int(ids[-1]) if ids else 0


def metrics_of(task_results: dict) -> dict:
    """``{metric: {"value", "stderr"}}`` from the harness's ``results[task]`` (values unchanged)."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        out[metric if filt == "none" else key] = {
            "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
    return out


def item_scores(samples: list[dict], metric: str) -> dict[int, float]:
    return {int(s["doc_id"]): float(s[metric]) for s in samples if metric in s}


def paired_difference(arm: dict[int, float], base: dict[int, float]) -> dict | None:
    """mean(d) and sd(d)/sqrt(n) of d_i = arm_i - base_i over the items both scored."""
    common = sorted(set(arm) & set(base))
    n = len(common)
    if n < 2:
        return None
    d = [arm[i] - base[i] for i in common]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return {"diff": mean, "stderr": math.sqrt(var / n), "n": n}


def _baseline_label(label: str, baseline: str) -> str:
    prefix = label.rsplit("/", 1)[0] + "/" if "/" in label else ""
    return f"{prefix}{baseline}"


def run(cfg: EvalConfig) -> dict:
    if not cfg.paths:
        raise ConfigError("eval: name at least one run or checkpoint folder: myopia eval RUN [RUN ...]")
    lm_eval, TaskManager = _lm_eval()
    models = discover(cfg.paths)
    os.makedirs(cfg.out, exist_ok=True)
    results: dict = {"experiment": "eval", "config": asdict(cfg), "lm_eval": lm_eval.__version__,
                     "models": {}, "tasks": {}, "paired": {}, "skipped": {}, "status": "completed"}
    samples: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="myopia-eval-") as tmp:
        include = [builtin_task_dir(os.path.join(tmp, "tasks"))] + ([cfg.task_dir] if cfg.task_dir else [])
        task_manager = TaskManager(include_path=include)
        exported = os.path.join(tmp, "models")
        os.makedirs(exported)
        for label, path in models:
            try:
                checkpoint = as_checkpoint(path, exported)
            except ConfigError as exc:
                print(f"myopia eval: skipping {label}: {exc}", flush=True)
                results["skipped"][label] = str(exc)
                continue
            print(f"myopia eval: {label} ({path}) on {', '.join(cfg.tasks)}", flush=True)
            out = evaluate_checkpoint(checkpoint, cfg, task_manager)
            results["models"][label] = {"path": path}
            samples[label] = out.get("samples", {})
            for task, task_results in out["results"].items():
                results["tasks"].setdefault(task, {})[label] = metrics_of(task_results)
            results.setdefault("n_samples", {}).update(out.get("n-samples", {}))
    for task, by_arm in results["tasks"].items():
        for label in by_arm:
            base = _baseline_label(label, cfg.baseline)
            if base == label or base not in by_arm:
                continue
            for metric in by_arm[label]:
                if "," in metric:
                    continue
                pair = paired_difference(item_scores(samples[label].get(task, []), metric),
                                         item_scores(samples[base].get(task, []), metric))
                if pair is not None:
                    results["paired"].setdefault(task, {}).setdefault(label, {})[metric] = {**pair, "baseline": base}
    results["paper"] = {t: {"sizes": PYTHIA_SIZES, "vanilla": v, "myopic": m}
                        for t, (v, m) in PAPER_ZERO_SHOT.items() if t in results["tasks"]}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = report_text(results)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    print(f"wrote {os.path.join(cfg.out, 'results.json')} and report.md", flush=True)
    return results


def fmt(value: float | None, stderr: float | None = None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return text + (f" ± {stderr:.4f}" if stderr is not None else "")


def report_text(results: dict) -> str:
    cfg = results["config"]
    shot = "zero-shot" if cfg["num_fewshot"] == 0 else f"{cfg['num_fewshot']}-shot"
    lines = ["# Benchmarks (lm-evaluation-harness)", "",
             f"lm-eval {results['lm_eval']}, {shot}, the harness's `hf` model in float32 on {cfg['device']}"
             + (f", first {cfg['limit']} items per task" if cfg["limit"] else "") + ". Values are the harness's "
             "own (± its standard error); the paired difference to the "
             f"{cfg['baseline']} arm is mean(d) ± sd(d)/√n over per-item scores d_i = arm − {cfg['baseline']}.", ""]
    for task, by_arm in results["tasks"].items():
        metrics = sorted({m for v in by_arm.values() for m in v if "," not in m},
                         key=lambda m: (m != "acc", m))
        n = (results.get("n_samples") or {}).get(task, {}).get("effective")
        lines += [f"## {task}" + (f" ({n} items)" if n else ""), "",
                  "| arm | " + " | ".join(f"{m} | {m} − {cfg['baseline']} (paired)" for m in metrics) + " |",
                  "|---|" + "---|---|" * len(metrics)]
        for label, values in by_arm.items():
            cells = []
            for m in metrics:
                v = values.get(m, {})
                pair = results["paired"].get(task, {}).get(label, {}).get(m)
                cells += [fmt(v.get("value"), v.get("stderr")),
                          fmt(pair["diff"], pair["stderr"], signed=True) if pair else "-"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        paper = results["paper"].get(task)
        if paper:
            pairs = ", ".join(f"{s} {v:.3f}/{m:.3f}" for s, v, m in zip(paper["sizes"], paper["vanilla"], paper["myopic"]))
            lines += ["", f"Paper (acc, Pythia fine-tunes, vanilla/myopic, read from its figures ±0.01): {pairs}."]
        lines.append("")
    for label, why in results["skipped"].items():
        lines.append(f"Skipped {label}: {why}")
    return "\n".join(lines) + "\n"


__all__ = ["PAPER_TASKS", "PAPER_ZERO_SHOT", "EvalConfig", "paired_difference", "run"]
