"""A whole training step (forward, backward, AdamW) per attention variant, with ratios to vanilla.

    python benchmarks/train_step.py                                   # CPU: small model, T = 512, 2048
    python benchmarks/train_step.py --device cuda --model gpt2-small --shapes 16x1024 4x4096
    python benchmarks/train_step.py --device cuda --model hf-gpt2 --shapes 8x1024   # make_myopic
    python benchmarks/train_step.py --device cuda --model gpt2-small --compile   # torch.compile

Variants: ``vanilla``, ``myopic`` (the paper's cut), ``myopic_kv`` (both through the fused O(n)
backend), ``eager (paper)``: the myopic mode through the eager n×n reference, i.e. the paper's
recipe, and the horizon cuts ``myopic:h=8`` and ``myopic:h=64`` (fused). Every variant runs the same model, data and optimiser. On CUDA all variants run in this
process one after another (bf16 autocast, peak = ``max_memory_allocated`` of the step, weights and
optimiser state included); on the CPU each runs in a fresh process, so that the peak resident set
is its own, and the step times (hence the ratios) come from one more process that runs the variants'
steps round-robin, so that the machine's drift between processes does not enter the ratios. MFU
uses the PaLM/nanoGPT count 6·N + 12·L·d·T FLOPs per token (N without position embeddings) against
the card's dense bf16 peak (``--peak-tflops``, 989 for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _measure import in_subprocess, measure, print_table

VARIANTS = {
    "vanilla": dict(cut="vanilla", backend="auto"),
    "myopic": dict(cut="myopic", backend="fused"),
    "myopic_kv": dict(cut="myopic_kv", backend="fused"),
    "eager (paper)": dict(cut="myopic", backend="reference"),
    "myopic:h=8": dict(cut="myopic:h=8", backend="fused"),
    "myopic:h=64": dict(cut="myopic:h=64", backend="fused"),
}
DEFAULT_VARIANTS = ["vanilla", "myopic", "myopic_kv", "eager (paper)", "myopic:h=8", "myopic:h=64"]

MODELS = {
    # name: (family, config) -- our GPT or a transformers model built from a config (no download)
    "small": ("ours", dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=256)),
    "gpt2-small": ("ours", dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768)),
    "hf-gpt2": ("hf-gpt2", dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768)),
    "hf-llama": ("hf-llama", dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4)),
    # the CPU's small shape (as "small") in transformers' implementations
    "hf-gpt2-small": ("hf-gpt2", dict(vocab_size=8192, n_layer=4, n_head=4, n_embd=256)),
    "hf-llama-small": ("hf-llama", dict(vocab_size=8192, hidden_size=256, intermediate_size=688,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)),
}


def build(model_name: str, T: int, variant: str, device: str) -> tuple[torch.nn.Module, int, int, int]:
    """(model, non-embedding-position parameter count, layers, width)."""
    family, cfg = MODELS[model_name]
    spec = VARIANTS[variant]
    torch.manual_seed(0)
    if family == "ours":
        from myopia import GPT, GPTConfig

        config = GPTConfig(block_size=T, dropout=0.0, attention=spec["cut"], backend=spec["backend"], **cfg)
        model = GPT(config)
        n = model.num_parameters(exclude_embeddings=True)
        layers, width = config.n_layer, config.n_embd
    else:
        import transformers

        from myopia.models.hf.myopic import make_myopic

        if family == "hf-gpt2":
            config = transformers.GPT2Config(n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **cfg)
            model = transformers.GPT2LMHeadModel(config)
            layers, width = config.n_layer, config.n_embd
            n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
        else:
            config = transformers.LlamaConfig(max_position_embeddings=T, **cfg)
            model = transformers.LlamaForCausalLM(config)
            layers, width = config.num_hidden_layers, config.hidden_size
            n = sum(p.numel() for p in model.parameters())
        model.config._attn_implementation = "sdpa"
        make_myopic(model, spec["cut"], backend=spec["backend"])
    return model.to(device).train(), n, layers, width


def make_step(variant: str, B: int, T: int, args):
    """``(step, flops_per_token)``: one training step of the variant's model on fixed data."""
    device = args.device
    model, n_params, layers, width = build(args.model, T, variant, device)
    vocab = MODELS[args.model][1].get("vocab_size")
    step_model = torch.compile(model) if args.compile else model
    if MODELS[args.model][0] == "ours":
        logits_of = step_model
    else:
        def logits_of(x):
            return step_model(input_ids=x, use_cache=False).logits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (B, T), generator=g).to(device)
    y = torch.randint(0, vocab, (B, T), generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)

    def step():
        with autocast:
            logits = logits_of(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, 6 * n_params + 12 * layers * width * T


def run_one(variant: str, B: int, T: int, args) -> dict:
    device = args.device
    step, flops_per_token = make_step(variant, B, T, args)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    res = measure(step, device, warmup=args.warmup, repeats=args.repeats)
    if device.startswith("cuda"):
        res["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    res["tok_s"] = B * T / (res["ms"] / 1e3)
    res["tflops"] = flops_per_token * res["tok_s"] / 1e12
    return res


def interleaved_ms(variants: list[str], B: int, T: int, args) -> dict[str, float]:
    """Median step time of every variant, measured round-robin in one process: on a shared CPU the
    machine's speed drifts by ±10% between processes, which sequential runs would read as a ratio."""
    steps = {v: make_step(v, B, T, args)[0] for v in variants}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, step in steps.items():
            start = time.perf_counter()
            step()
            times[v].append((time.perf_counter() - start) * 1e3)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="default: small on CPU, gpt2-small on CUDA")
    p.add_argument("--shapes", nargs="+", default=None, help="BATCHxT, e.g. 16x1024 (default: 8x512 2x2048 on CPU)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default inductor)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card, for MFU")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", nargs=3, metavar=("VARIANT", "B", "T"), help=argparse.SUPPRESS)
    p.add_argument("--interleave", nargs=2, metavar=("B", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("gpt2-small" if cuda else "small")
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]), args)))
        return
    if args.interleave:
        print(json.dumps(interleaved_ms(args.variants, int(args.interleave[0]), int(args.interleave[1]), args)))
        return
    shapes = args.shapes or (["16x1024", "4x4096"] if cuda else ["8x512", "2x2048"])
    rows = []
    for shape in shapes:
        B, T = (int(s) for s in shape.lower().split("x"))
        base = None
        common = ["--device", args.device, "--model", args.model, "--warmup", str(args.warmup),
                  "--repeats", str(args.repeats)] + (["--compile"] if args.compile else [])
        # CPU: step times from one round-robin process (the ratios), peak memory from a fresh process each
        inter = {} if cuda else in_subprocess([__file__, *common, "--variants", *args.variants,
                                               "--interleave", str(B), str(T)])
        for variant in args.variants:
            if cuda:
                try:
                    res = run_one(variant, B, T, args)
                except torch.OutOfMemoryError:
                    res = {"error": "out of memory"}
                gc.collect()  # the variant's model and optimiser state go before the next is built
                torch.cuda.empty_cache()
            else:
                res = in_subprocess([__file__, *common, "--one", variant, str(B), str(T)])
                if "error" not in res and variant in inter:
                    res["ms"] = inter[variant]
                    res["tok_s"] = B * T / (res["ms"] / 1e3)
            row = {"shape": f"{B}x{T}", "variant": variant}
            if "error" in res:
                row["ms"] = res["error"]
            else:
                base = base or (res if variant == "vanilla" else None)
                row.update(ms=f"{res['ms']:.1f}", peak_mib=f"{res['peak_mib']:.0f}", tok_s=f"{res['tok_s']:.0f}")
                if base:
                    row["x_time"] = f"{res['ms'] / base['ms']:.3f}"
                    row["x_mem"] = f"{res['peak_mib'] / max(base['peak_mib'], 1e-9):.3f}"
                if cuda:
                    row["mfu"] = f"{100 * res['tflops'] / args.peak_tflops:.1f}%"
            rows.append(row)
            print(json.dumps(row), flush=True)
    card = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    title = (f"{date.today()} {card}, torch {torch.__version__}, model {args.model}"
             f"{' (torch.compile)' if args.compile else ''}, median of {args.repeats} steps")
    print_table(rows, ["shape", "variant", "ms", "x_time", "peak_mib", "x_mem", "tok_s"] + (["mfu"] if cuda else []),
                title)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"title": title, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
