"""Peak memory per rank while an FSDP run saves a checkpoint: the full-state format (every rank gathers
the whole model and optimiser, rank 0 writes one file) against the sharded one (each rank writes its
own shards with torch.distributed.checkpoint). Run under torchrun on CPU (gloo):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/checkpoint_memory.py --format sharded

    ... --format full   (the same model; the format every rank gathering the full state)

Each rank prints its resident memory before the save and the peak added during it (Linux: VmHWM,
reset through /proc/self/clear_refs just before the save), as a fraction of the full state's size.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from myopia.models.gpt import GPT, GPTConfig
from myopia.train.checkpoint import capture, save_checkpoint, save_sharded_checkpoint
from myopia.train.distributed import parallelize, setup


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--format", choices=["full", "sharded"], required=True,
                   help="full: every rank gathers, rank 0 writes one file (myopia's DDP format); sharded: DCP")
    args = p.parse_args()
    dist = setup("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_layer=args.n_layer, n_head=8, n_embd=args.n_embd, block_size=16))
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = parallelize(model, dist, "fsdp", torch.device("cpu"))
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    wrapped(torch.zeros(2, 8, dtype=torch.long)).float().pow(2).mean().backward()
    opt.step()
    full_state_mib = n_params * 4 * 3 / 2**20  # weights + two Adam moments, float32
    root = tempfile.mkdtemp() if dist.is_main else None
    root = dist.broadcast_object(root)
    results = {}
    for fmt in (args.format,):
        dist.barrier()
        before = _status("VmRSS")
        _reset_peak()
        if fmt == "full":
            model_state, optim_state = capture(wrapped, opt)
            if dist.is_main:
                save_checkpoint(os.path.join(root, fmt), 1, model_state, optim_state, {})
            del model_state, optim_state
            dist.barrier()
        else:
            save_sharded_checkpoint(os.path.join(root, fmt), 1, wrapped, opt, {}, dist)
        results[fmt] = (before, _status("VmHWM") - before)
    before, peak = results[args.format]
    print(f"{args.format} rank {dist.rank}/{dist.world}: {n_params / 1e6:.0f}M parameters, full state "
          f"{full_state_mib:,.0f} MiB; peak added while saving +{peak:,.0f} MiB ({peak / full_state_mib:.2f} of the "
          f"full state) over {before:,.0f} MiB resident", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
