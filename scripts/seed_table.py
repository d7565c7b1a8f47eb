"""The synthetic seed sweep's table (developer tool, not part of the package; issue 32).

Reads the results.json of one or more ``myopia synthetic`` runs and prints, per seed, the vanilla
arm's loss as a multiple of the trivial loss, its layer-1 R² for f(x_n) (the untrained model's in
brackets), the myopic arm's if it ran, and whether the seed meets the bars: vanilla <= 0.3x trivial
with R² >= 0.75; myopic >= 0.8x with R² <= untrained + 0.05.

    python scripts/seed_table.py runs/seed-sweep/s20 runs/seed-sweep/s21 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from myopia.experiments.synthetic.pipeline import layer1_r2

VANILLA_RATIO, VANILLA_R2 = 0.3, 0.75
MYOPIC_RATIO, MYOPIC_R2_MARGIN = 0.8, 0.05


def rows(folders: list[str], condition: str = "shift1_p1") -> list[dict]:
    out = []
    for folder in folders:
        results = json.loads((Path(folder) / "results.json").read_text())
        runs = results["conditions"][condition]["runs"]
        for seed, arms in runs.items():
            row = {"seed": int(seed), "folder": folder}
            for name in ("vanilla", "myopic"):
                if name in arms:
                    arm = arms[name]
                    row[name] = (arm["ratio_to_trivial"], layer1_r2(arm["probe"]), layer1_r2(arm["probe_untrained"]))
            out.append(row)
    return sorted(out, key=lambda r: r["seed"])


def verdict(row: dict) -> bool:
    ok = True
    if "vanilla" in row:
        ratio, r2, _ = row["vanilla"]
        ok &= ratio <= VANILLA_RATIO and r2 >= VANILLA_R2
    if "myopic" in row:
        ratio, r2, untrained = row["myopic"]
        ok &= ratio >= MYOPIC_RATIO and r2 <= untrained + MYOPIC_R2_MARGIN
    return ok


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python scripts/seed_table.py RUN_FOLDER [RUN_FOLDER ...]")
    table = rows(argv)
    print("| seed | vanilla × trivial | vanilla layer-1 R² (untrained) | myopic × trivial | myopic R² | meets the bars |")
    print("|---|---|---|---|---|---|")
    for row in table:
        van = row.get("vanilla")
        myo = row.get("myopic")
        cells = [str(row["seed"]),
                 f"{van[0]:.3f}" if van else "", f"{van[1]:.3f} ({van[2]:.3f})" if van else "",
                 f"{myo[0]:.3f}" if myo else "", f"{myo[1]:.3f}" if myo else "",
                 "yes" if verdict(row) else "**no**"]
        print("| " + " | ".join(cells) + " |")
    passed = sum(verdict(r) for r in table)
    print(f"\n{passed}/{len(table)} seeds meet the bars")


if __name__ == "__main__":
    main(sys.argv[1:])
