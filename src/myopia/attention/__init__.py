"""Causal self-attention in every mode myopia studies, behind one function.

>>> out = attention(q, k, v, cut="myopic", k_past=k_of_detached_input, v_past=v_of_detached_input)
>>> out = attention(q, k, v, cut=Cut.parse("myopic_kv:h=8"))

The gradient cut is a :class:`~myopia.attention.cut.Cut` (or its text form) for *one* layer: a model
resolves per-layer cuts with ``cut.for_layer(i)`` before calling.

Shapes are SDPA's, ``(batch, heads, time, head_dim)``; keys and values may have fewer heads than
queries (grouped-query attention). See :mod:`myopia.attention.fused` for the gradient each mode gives.

Modules: :mod:`~.cut` (the cut and its grammar), :mod:`~.dispatch` (which backend runs a call),
:mod:`~.reference` (the eager n×n recipe), :mod:`~.fused` (the O(n)-memory custom op),
:mod:`~.kernels` and :mod:`~.triton_diag` (the kernels under it), :mod:`~.projection`.
"""

from myopia.attention.cut import ATTENTION_MODES, BACKENDS, MYOPIC_MODES, VANILLA, Cut, CutError
from myopia.attention.dispatch import additive_mask, attention
from myopia.attention.fused import fused_attention_with_lse
from myopia.attention.reference import causal_additive_mask, expand_kv, reference_attention

__all__ = [
    "ATTENTION_MODES",
    "BACKENDS",
    "MYOPIC_MODES",
    "VANILLA",
    "Cut",
    "CutError",
    "additive_mask",
    "attention",
    "causal_additive_mask",
    "expand_kv",
    "fused_attention_with_lse",
    "reference_attention",
]
