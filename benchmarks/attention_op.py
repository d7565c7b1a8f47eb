"""Forward+backward of the attention op: vanilla, myopic, myopic_kv and the eager reference.

Prints time and peak memory per variant and sequence length, with ratios to vanilla, in one run:

    python benchmarks/attention_op.py                       # CPU, float32, T = 512 2048 8192
    python benchmarks/attention_op.py --device cuda --dtype bfloat16

``myopic`` is fed the same keys/values as its past (as myopia.GPT does), so it exercises the full
gradient routing. ``eager`` is the paper's recipe (myopic_kv through the n×n reference backend).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _measure import in_subprocess, measure, print_table

from myopia.attention import attention

VARIANTS = {
    "vanilla": dict(cut="vanilla", backend="fused"),
    "myopic": dict(cut="myopic", backend="fused"),
    "myopic_kv": dict(cut="myopic_kv", backend="fused"),
    "eager (paper)": dict(cut="myopic_kv", backend="reference"),
}


def run_one(variant: str, T: int, args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(h):
        return torch.randn(args.batch, h, T, args.head_dim, generator=g).to(device, dtype).requires_grad_()

    q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    do = torch.randn(args.batch, args.heads, T, args.head_dim, generator=g).to(device, dtype)
    spec = VARIANTS[variant]
    past = dict(k_past=k, v_past=v) if spec["cut"] == "myopic" else {}

    def step():
        out = attention(q, k, v, **spec, **past)
        out.backward(do)
        q.grad = k.grad = v.grad = None

    return measure(step, device, warmup=1, repeats=args.repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker[0], int(args.worker[1]), args)))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    base = [a for a in sys.argv[1:]]
    for T in args.T:
        results = {}
        for variant in VARIANTS:
            if args.device == "cpu":  # fresh process: the peak resident set is per process
                results[variant] = in_subprocess([__file__, *base, "--worker", variant, str(T)])
            else:
                results[variant] = run_one(variant, T, args)
        van = results["vanilla"]
        for variant, r in results.items():
            row = {"T": T, "variant": variant}
            if "error" in r:
                row["time ms"] = r["error"][:60]
            else:
                row.update({
                    "time ms": f"{r['ms']:.1f}",
                    "x vanilla": f"{r['ms'] / van['ms']:.2f}",
                    "peak MiB": f"{r['peak_mib']:.0f}",
                    "mem x vanilla": f"{r['peak_mib'] / max(van['peak_mib'], 1e-9):.2f}",
                })
            rows.append(row)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    title = (f"attention op fwd+bwd, {args.device} ({device}), {args.dtype}, B={args.batch} H={args.heads} "
             f"Hkv={args.kv_heads} D={args.head_dim}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print_table(rows, ["T", "variant", "time ms", "x vanilla", "peak MiB", "mem x vanilla"], title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
