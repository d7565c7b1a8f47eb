"""Which arms an experiment compares: (treatment, baseline) pairs, written ``TREATMENT/BASELINE``.

An arm's name never holds ``/`` (it names a folder), so ``myopic:h=8/vanilla`` is unambiguous. By
default every arm is compared with ``vanilla`` (when there is a vanilla arm); the local-myopic arm is
left out, since its comparison with vanilla is the local myopia bonus (``vanilla − local-myopic``).
"""

from __future__ import annotations

from dataclasses import dataclass

from myopia.config import ConfigError
from myopia.runs.arms import LOCAL_ARM

BASELINE = "vanilla"


@dataclass(frozen=True)
class Pair:
    """``treatment − baseline`` is the gap (positive: the treatment's loss is higher)."""

    treatment: str
    baseline: str

    @property
    def label(self) -> str:
        """How results.json keys the comparison and reports name it: ``"myopic vs vanilla"``."""
        return f"{self.treatment} vs {self.baseline}"


PAPER_PAIR = Pair("myopic", BASELINE)
"""The paper's comparison; reports set the paper's numbers beside this pair only."""


def default_pairs(names: list[str]) -> list[Pair]:
    """Every arm (but vanilla and local-myopic) against vanilla, in the arms' order; none without vanilla."""
    if BASELINE not in names:
        return []
    return [Pair(name, BASELINE) for name in names if name not in (BASELINE, LOCAL_ARM)]


def parse_pairs(specs: list[str], names: list[str], option: str) -> list[Pair]:
    """The pairs ``specs`` names among the arms ``names`` (empty: :func:`default_pairs`); one-line
    errors naming ``option`` and the fix."""
    if not specs:
        return default_pairs(names)
    pairs: list[Pair] = []
    for spec in specs:
        treatment, slash, baseline = spec.partition("/")
        if not slash or not treatment or not baseline or "/" in baseline:
            raise ConfigError(f"{option}: {spec!r} is not TREATMENT/BASELINE; write e.g. myopic/vanilla")
        for name in (treatment, baseline):
            if name not in names:
                raise ConfigError(f"{option}: {spec!r} names the arm {name!r}, which is not trained here "
                                  f"(arms: {', '.join(names)}); add it to --arms or compare arms from that list")
        if treatment == baseline:
            raise ConfigError(f"{option}: {spec!r} compares an arm with itself; name two different arms")
        pair = Pair(treatment, baseline)
        if pair in pairs:
            raise ConfigError(f"{option}: {spec!r} is given twice")
        pairs.append(pair)
    return pairs


__all__ = ["BASELINE", "PAPER_PAIR", "Pair", "default_pairs", "parse_pairs"]
