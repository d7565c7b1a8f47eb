"""The attention modes myopia knows and the checks on them.

Forward values of ``vanilla``, ``myopic`` and ``myopic_kv`` are identical; only their gradients
differ. ``bigram`` changes the forward pass: every position attends only to itself.
"""

from __future__ import annotations

from typing import Literal

AttentionMode = Literal["vanilla", "myopic", "myopic_kv", "bigram"]
ATTENTION_MODES: tuple[str, ...] = ("vanilla", "myopic", "myopic_kv", "bigram")
MYOPIC_MODES: tuple[str, ...] = ("myopic", "myopic_kv")

Backend = Literal["auto", "fused", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "fused", "reference")


def check_mode(mode: str, beta: float = 0.0) -> None:
    """Raise ``ValueError`` naming the bad value and the allowed ones."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta={beta} is outside [0, 1] (0 = myopic, 1 = vanilla gradients)")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
