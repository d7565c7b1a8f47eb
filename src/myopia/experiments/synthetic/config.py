"""``myopia synthetic``'s configuration: the experiment's dataclasses, its presets, the paper's
numbers, and the conditions (shifts, p values, the shift-0 control) a configuration expands into."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from myopia.config import ConfigError
from myopia.models.gpt import GPTConfig
from myopia.runs.arms import Arm, parse_arms
from myopia.runs.feature_attribution import AttributionConfig
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask
from myopia.train.config import OptimConfig, TrainConfig

PAPER = {  # Wu et al. (paper.md §3): normalised Huber loss and layer-1 probe R² for sin(10 x_n)
    "trivial": 1.2569,
    "vanilla_loss": "0.003-0.096 (over p)",
    "myopic_loss": {1.0: 1.257, 0.3: 1.034, 0.1: 0.966, 0.01: 1.103},
    "vanilla_r2": "~0.9 (0.985 for d=256)",
    "myopic_r2": "< 0.02",
    "breadcrumbs_myopic_train_loss": 0.10,
}


@dataclass
class ProbeConfig:
    """Linear probes of the residual stream."""

    lookbacks: int = 20
    """Probe f(x_{n-k}) for k = 0..lookbacks (capped at seq_len - 8); positions n >= that cap are used."""
    train_sequences: int = 2048
    """Fresh sequences to fit the probes on."""
    test_sequences: int = 1024
    """Fresh sequences to score them on (held-out R²)."""
    control_frequencies: list[float] = field(default_factory=lambda: [7.0, 13.0])
    """Control targets sin(c·x_n) at frequencies other than the task's."""
    ridge: float = 1e-4
    """Ridge penalty relative to the mean feature variance."""

    def __post_init__(self) -> None:
        if self.lookbacks < 0 or self.train_sequences < 16 or self.test_sequences < 16:
            raise ValueError("lookbacks must be >= 0 and train/test_sequences >= 16")


@dataclass
class SyntheticExperiment:
    """The synthetic pre-caching experiment (paper §4) with probes, controls and a report."""

    out: str = "runs/synthetic"
    """Run directory (results.json, report.md, plots, per-arm metrics and checkpoints)."""
    arms: list[str] = field(default_factory=lambda: ["vanilla", "myopic"])
    """Arms trained on the task: vanilla, myopic, myopic_kv, bigram, MODE@BETA."""
    control_arms: list[str] = field(default_factory=lambda: ["myopic"])
    """Arms also trained on the shift-0 breadcrumbs control (empty = no control)."""
    pairs: list[str] = field(default_factory=list)
    """Comparisons, TREATMENT/BASELINE by arm name (e.g. myopic:h=2/vanilla): per condition, the
    treatment's loss and layer-1 R² gain minus the baseline's, paired by seed. Empty = every arm
    against vanilla."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds (initialisation and data); results carry a 95% CI over them."""
    p_values: list[float] = field(default_factory=list)
    """Values of p to sweep (empty = task.p only)."""
    shifts: list[int] = field(default_factory=list)
    """Shifts s of the task to run, one condition each (empty = task.shift only). With horizon arms
    (myopic:h=W) the results gain a horizon x shift grid and horizon_heatmap.png."""
    resume: bool = False
    """Continue an interrupted run in --out."""
    task: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(n_layer=2, n_head=2, n_embd=128, activation="relu"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    gradient_split_batches: int = 1
    """During training, split the held-out gradient into its myopic and off-diagonal ("future")
    parts on this many held-out batches, at steps 0, 1, 2, 4, ... and every train.eval_every steps
    (0 = off; arms whose forward is vanilla's). The task needs pre-caching, so the future part
    is where a vanilla model's pre-caching signal shows (docs/synthetic.md)."""

    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    """Per-feature attribution during training: at these layers and positions, which part of each arm's
    own gradient (direct, pre-cached, shared) moves the f(x_n) probe's reading towards f(x_t)
    (docs/attribution.md). Off by default; the ``attribution-cpu`` preset turns it on."""

    def __post_init__(self) -> None:
        if self.gradient_split_batches < 0:
            raise ValueError(f"gradient_split_batches={self.gradient_split_batches} must be >= 0 (0 = off)")


_CPU = {  # the sin(4x) budget shared by cpu-sin4, breadcrumbs and the horizon presets (docs/synthetic.md)
    "model": dict(n_layer=2, n_head=2, n_embd=128, activation="relu", dropout=0.0),
    # float32 and AdamW's per-parameter loop on every CPU: the presets' seeds and bars were calibrated so
    # (the fused kernel and bf16 autocast change the rounding, and seeds near the plateau's edge flip)
    "optim": {"lr": 1.2e-3, "weight_decay": 0.01, "warmup": 0.01, "fused": False},
    # float32 on every CPU: the presets' seeds and bars were calibrated in float32 (train.precision auto
    # would run bf16 autocast on a CPU with bf16 units, which none of these figures was measured with)
    "train": {"steps": 4000, "batch_size": 96, "eval_every": 1000, "eval_batches": 16,
              "checkpoint_every": 1000, "log_every": 25, "precision": "fp32"},
}
_CPU_TASK = {"seq_len": 32, "p": 1.0, "shift": 1, "window": 10, "f": "sin", "frequency": 4.0}
_PROBE = {"train_sequences": 2048, "test_sequences": 1024}
PRESETS: dict[str, dict] = {
    # The paper's task, f = sin(10x), with its shift-0 breadcrumbs control on 2 CPU cores: the paper's
    # model shape, T = 32, 4,000 steps of batch 96, but rotary positions and every Linear at PyTorch's
    # default initialisation, without gradient clipping (as the reference trains), and a 10% warm-up
    # (400 steps; with 1% vanilla stayed on the plateau at 4 of 10 fresh seeds, with 10% at none of 10:
    # docs/synthetic.md, "Seeds that stay on the plateau"). With learned
    # positions or GPT-2's std-0.02 initialisation the model sits at the trivial loss for most of this
    # budget (docs/synthetic.md, "sin(10x) on a laptop").
    "cpu": {**_CPU, "out": "runs/synthetic-cpu", "task": {**_CPU_TASK, "frequency": 10.0},
            "model": {**_CPU["model"], "position": "rotary", "init": "torch-default", "io_init": "torch-default"},
            "optim": {**_CPU["optim"], "warmup": 0.1, "grad_clip": 0.0}, "probe": _PROBE},
    # The earlier cpu preset: f = sin(4x), learned positions, GPT-2's initialisation, gradient clipping
    # at 1.0. ~4.5 minutes per arm on 2 cores; the horizon and breadcrumbs presets use its model.
    "cpu-sin4": {**_CPU, "out": "runs/synthetic-cpu-sin4", "task": _CPU_TASK, "probe": _PROBE},
    # Per-feature attribution on cpu-sin4 (where vanilla reliably learns f(x_n) at layer 1): vanilla and
    # myopic, the f(x_n) probe at layer 1 split at positions 8, 16, 24 and the last (31, where nothing
    # can be pre-cached), measured at 0, 1, 2, 4, ..., every 250 steps. docs/attribution.md.
    "attribution-cpu": {**_CPU, "out": "runs/synthetic-attribution-cpu", "task": _CPU_TASK, "probe": _PROBE,
                        "control_arms": [], "gradient_split_batches": 0,
                        "attribution": {"layers": [1], "positions": [8, 16, 24, 31], "every": 250}},
    # The shift-0 control alone at the cpu-sin4 budget.
    "breadcrumbs": {**_CPU, "out": "runs/synthetic-breadcrumbs", "arms": ["vanilla", "myopic"],
                    "control_arms": [], "task": {**_CPU_TASK, "shift": 0}},
    # The paper's setting (a GPU run): 2 layers, d=128, 2 heads, ReLU, AdamW lr 1e-3 wd 0.01,
    # 1% warmup + cosine, batch 512, 58,593 steps (~30M sequences), p in {0.01, 0.1, 0.3, 1}. The
    # paper's initialisation: GPT-2's std 0.02 in the body, PyTorch's default in the Linear(2 -> d)
    # input and Linear(d -> 1) output layers, which it attaches after GPT2Model's init (paper.md §3.2).
    # No gradient clipping: the reference trains with Lightning's Trainer, whose gradient_clip_val it
    # leaves unset (our default clips at 1.0).
    "paper": {
        "out": "runs/synthetic-paper",
        "p_values": [1.0, 0.3, 0.1, 0.01],
        "task": {"seq_len": 64, "shift": 1, "window": 10, "f": "sin", "frequency": 10.0},
        "model": {**_CPU["model"], "block_size": 64, "io_init": "torch-default"},
        "optim": {"lr": 1e-3, "weight_decay": 0.01, "warmup": 0.01, "grad_clip": 0.0},
        "train": {"steps": 58593, "batch_size": 512, "eval_every": 5000, "eval_batches": 98,
                  "checkpoint_every": 5000, "log_every": 100},
        "probe": {"train_sequences": 4608, "test_sequences": 2048},
    },
    # Horizon x shift on the cpu preset's task and model, sized down to fit 30 minutes: shifts 1 and 4
    # (not 1, 2, 4), vanilla and myopic:h=w for w in {0, 1, 4} (not 0, 1, 2, 4, 8), 3/4 of the cpu preset's
    # steps, one seed. Estimate (not a run): a step of batch 96 timed at 2 threads (both CPU locks,
    # 2026-11-30) takes 50 ms vanilla, 52 ms myopic, 60 ms myopic:h=4; x 1.3 (the cpu preset's measured
    # 4-4.5 min per 4,000-step arm, probes included, over its raw step time): 2 shifts x 3,000 steps x
    # (0.050 + 0.052 + 2 x 0.060) s x 1.3 = ~29 min on 2 cores. The full grid (--shifts 1,2,4 and
    # w in 0,1,2,4,8 at 4,000 steps) is ~90 min per seed.
    "horizon-cpu": {**_CPU, "out": "runs/synthetic-horizon-cpu", "task": _CPU_TASK, "control_arms": [],
                    "train": {**_CPU["train"], "steps": _CPU["train"]["steps"] * 3 // 4},
                    "shifts": [1, 4], "arms": ["vanilla", *(f"myopic:h={w}:name=h{w}" for w in (0, 1, 4))]},
    # The full horizon x shift grid at the cpu preset's budget: shifts 1, 2, 4 x vanilla and w in
    # {0, 1, 2, 4, 8}, 4,000 steps, seeds 0, 1, 2 (54 trainings). Opt-in: ~90 minutes per seed on 2 cores
    # (the estimate above, scaled), so ~4.5 hours; horizon-cpu is its 30-minute approximation.
    "horizon-full": {**_CPU, "out": "runs/synthetic-horizon-full", "task": _CPU_TASK, "control_arms": [],
                     "seeds": [0, 1, 2], "shifts": [1, 2, 4],
                     "arms": ["vanilla", *(f"myopic:h={w}:name=h{w}" for w in (0, 1, 2, 4, 8))]},
    # A smoke-sized run for tests and quick looks.
    "tiny": {
        "out": "runs/synthetic-tiny",
        "task": {"seq_len": 16, "window": 4},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "activation": "relu"},
        "optim": {"lr": 3e-3},
        "train": {"steps": 60, "batch_size": 32, "eval_batches": 4, "log_every": 10, "progress": False},
        "probe": {"lookbacks": 4, "train_sequences": 256, "test_sequences": 128},
    },
}


@dataclass(frozen=True)
class Condition:
    """One setting of the task (a shift and p, or the shift-0 control) and the arms trained on it."""

    label: str
    task: SyntheticConfig
    arms: tuple[Arm, ...]
    control: bool

    def make_task(self, seed: int) -> SyntheticTask:
        return SyntheticTask(self.task, seed)


def conditions(cfg: SyntheticExperiment) -> list[Condition]:
    """The grid's conditions: the task at every shift and p, then the shift-0 control (with the
    control arms), each with its arms; one-line errors for settings that do not fit."""
    arms = tuple(parse_arms(cfg.arms))
    ps = cfg.p_values or [cfg.task.p]
    out = []
    for shift in cfg.shifts or [cfg.task.shift]:
        for p in ps:
            try:
                task = replace(cfg.task, p=float(p), shift=int(shift))
            except ValueError as exc:
                raise ConfigError(f"{'shifts' if cfg.shifts else 'p_values'}: {exc}") from None
            out.append(Condition(f"shift{task.shift}_p{p:g}", task, arms, control=False))
    if cfg.control_arms:
        if 0 in (cfg.shifts or [cfg.task.shift]):
            raise ConfigError("control_arms: the task already has shift 0; the control is redundant (set control_arms=)")
        task = replace(cfg.task, shift=0, p=float(ps[0]))
        out.append(Condition(f"shift0_p{ps[0]:g}", task, tuple(parse_arms(cfg.control_arms)), control=True))
    return out


__all__ = ["PAPER", "PRESETS", "Condition", "ProbeConfig", "SyntheticExperiment", "conditions"]
