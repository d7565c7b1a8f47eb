"""The 49k-vocabulary loss, forward and backward, three ways, with its time and peak memory:

- ``plain``: ``F.cross_entropy(F.linear(h, W).float(), y)`` (the logits tensor, its log-softmax and, under
  autocast, a bfloat16 copy, all alive until the backward);
- ``myopia``: :func:`myopia.models.token_loss.linear_cross_entropy` (row chunks, gradients computed in
  the forward);
- ``torch chunked``: PyTorch 2.13's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  with its automatic chunking, and with 512 rows per chunk (``torch chunked 512``).

    python benchmarks/token_loss.py                       # SmolLM2's head: d = 576, V = 49,152
    python benchmarks/token_loss.py --rows 512 2048 --precisions fp32 bf16

Each variant runs in a fresh process (peak resident memory added by its first call, forward and
backward: Linux's VmHWM reset just before) and
reports the median of ``--repeats`` timed calls, and the largest relative difference of its loss and
gradients from ``plain`` in float32 (``exact``: the same to float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("plain", "myopia", "torch chunked", "torch chunked 512")


def loss_fn(variant: str):
    if variant == "plain":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    if variant == "myopia":
        from myopia.models.token_loss import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y).mean()
    from torch.nn import LinearCrossEntropyOptions

    options = (LinearCrossEntropyOptions() if variant == "torch chunked" else
               LinearCrossEntropyOptions(batch_chunk_size=512, chunking_method=None, acc_policy="accurate"))

    def chunked(h, w, y):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
        with torch.autocast("cpu", enabled=False):  # its op does not autocast: give it the autocast dtype
            return F.linear_cross_entropy(h.to(dtype), w.to(dtype), y, options=options).float()

    return chunked


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> int:
    """Reset Linux's peak resident memory (VmHWM) to the current (VmRSS) and return it, in KiB;
    elsewhere the process's peak so far (getrusage)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_one(variant: str, rows: int, d: int, vocab: int, precision: str, repeats: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, d, generator=g, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (rows,), generator=g)
    fn = loss_fn(variant)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        h.grad = w.grad = None
        with autocast:
            loss = fn(h, w, y)
        loss.backward()
        return loss

    base = _reset_peak()  # the first call's peak: later calls reuse what it allocated
    step()
    peak = (_peak_kib() - base) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    out = {"ms": 1e3 * statistics.median(times), "added_mib": peak, "loss": float(loss)}
    if precision == "fp32":
        ref = loss_fn("plain")
        h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        lr = ref(h2, w2, y)
        lr.backward()
        out["max_rel_diff"] = max(abs(float(loss) - float(lr)) / abs(float(lr)),
                                  float((h.grad - h2.grad).abs().max() / h2.grad.abs().max()),
                                  float((w.grad - w2.grad).abs().max() / w2.grad.abs().max()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=[512, 2048], help="tokens (rows of the head)")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        variant, rows, precision = args.one
        print(json.dumps(run_one(variant, int(rows), args.d, args.vocab, precision, args.repeats)))
        return
    print(f"| precision | rows | variant | ms | × plain | added MiB | max rel. diff (fp32) |\n|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        for rows in args.rows:
            base = None
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--d", str(args.d), "--vocab", str(args.vocab), "--repeats",
                       str(args.repeats), "--one", variant, str(rows), precision]
                done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if done.returncode != 0:
                    print(f"| {precision} | {rows} | {variant} | failed: {done.stderr.strip().splitlines()[-1]} |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                base = base or (r if variant == "plain" else None)
                ratio = f"{r['ms'] / base['ms']:.2f}" if base else "-"
                diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-"
                print(f"| {precision} | {rows} | {variant} | {r['ms']:.0f} | {ratio} | {r['added_mib']:.0f} | {diff} |",
                      flush=True)


if __name__ == "__main__":
    main()
