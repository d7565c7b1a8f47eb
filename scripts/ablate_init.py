"""Issue 19's initialisation ablation (developer tool, not part of the package).

Runs ``myopia synthetic`` with every model re-initialised after construction by a list of changes:

    python scripts/ablate_init.py CHANGES [myopia synthetic options...]

CHANGES is a comma list applied in order to the model GPT built (std-0.02 "gpt2" init), or ``none``:

    in-torch        the continuous input Linear at PyTorch's default (kaiming-uniform, uniform bias)
    out-torch       the continuous output Linear at PyTorch's default
    body-torch      every Linear inside the blocks at PyTorch's default (weights and biases)
    body-std=S      every Linear inside the blocks N(0, S), zero biases, residual projections S/sqrt(2L)
    no-resid-scale  the residual projections (attn.c_proj, mlp.c_proj) N(0, init_std), not /sqrt(2L)
    body-bias-torch only the blocks' Linear biases at PyTorch's default (weights unchanged)
    body-bias-zero  the blocks' Linear biases zero (weights unchanged)
    pos-std=S       the learned position table N(0, S)

The untrained-probe baseline gets the same changes (it is built by the same build_model): the
script patches both places that build the synthetic experiment's models, the grid that trains them
(``myopia.runs.grid``) and the pipeline that probes the untrained one.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

import myopia.experiments.synthetic.pipeline as synthetic
import myopia.runs.grid as grid
from myopia.cli import main
from myopia.runs.arms import build_model


def _default_bias(linear: nn.Linear) -> None:
    if linear.bias is not None:
        bound = 1 / math.sqrt(linear.in_features)
        nn.init.uniform_(linear.bias, -bound, bound)


def apply_changes(model, changes: list[str]) -> None:
    cfg = model.config
    body = [m for b in model.blocks for m in b.modules() if isinstance(m, nn.Linear)]
    resid = [w for b in model.blocks for w in (b.attn.c_proj, b.mlp.c_proj)]
    for change in changes:
        name, _, value = change.partition("=")
        with torch.no_grad():
            if name == "in-torch":
                model.wte.reset_parameters()
            elif name == "out-torch":
                model.head.reset_parameters()
            elif name == "body-torch":
                for m in body:
                    m.reset_parameters()
            elif name == "body-std":
                std = float(value)
                for m in body:
                    nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                for m in resid:
                    nn.init.normal_(m.weight, std=std / math.sqrt(2 * cfg.n_layer))
            elif name == "no-resid-scale":
                for m in resid:
                    nn.init.normal_(m.weight, std=cfg.init_std)
            elif name == "body-bias-torch":
                for m in body:
                    _default_bias(m)
            elif name == "body-bias-zero":
                for m in body:
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            elif name == "pos-std":
                nn.init.normal_(model.wpe.weight, std=float(value))
            else:
                raise SystemExit(f"unknown change {change!r}")


def patched(original, changes):
    def build_model(base, arm, overrides, seed):
        model = original(base, arm, overrides, seed)
        apply_changes(model, changes)
        return model

    return build_model


if __name__ == "__main__":
    spec, rest = sys.argv[1], sys.argv[2:]
    changes = [] if spec == "none" else spec.split(",")
    grid.build_model = synthetic.build_model = patched(build_model, changes)
    print(f"ablate_init: changes {changes or 'none'}", flush=True)
    sys.exit(main(["synthetic", *rest]))
