"""One immutable description of a gradient cut: :class:`Cut`, and the arm grammar users type.

A cut says which gradient terms of causal attention a training run keeps:

- ``mode``: ``vanilla`` (everything) | ``myopic`` (the paper's: past positions' *attention inputs* are
  constants for later positions, read through live key/value weights) | ``myopic_kv`` (past keys and
  values themselves are constants) | ``bigram`` (forward changes: each position attends to itself);
- ``beta`` in [0, 1]: the weight of the gradient that crosses a cut edge (0 = cut, 1 = vanilla);
- ``horizon`` w: at every attention layer, the query at position i still passes its full gradient to
  key/value positions j with i − j ≤ w; only edges reaching farther back are cut as ``mode`` says
  (``None`` = every past position is cut: the paper's myopia). Horizon 0 *is* the mode's cut and
  horizon ≥ T − 1 *is* vanilla: :meth:`Cut.at_length` resolves both exactly;
- ``layers``: the blocks the cut applies to (``None`` = all); the others train vanilla;
- ``name``: an optional display name (arm folders, tables, plots).

Written as text (an arm on the command line, a model config): ``MODE[@BETA][:KEY=VALUE]...`` with keys
``h`` (or ``horizon``), ``layers`` (``2``, ``0-1``, ``0+2-3``: no commas, so that a comma-separated
``--arms`` list stays unambiguous) and ``name``::

    myopic                  the paper's myopic training
    myopic@0.5              half of every crossing gradient
    myopic:h=8              gradient crosses at most 8 positions per layer
    myopic:layers=0-1       myopic in blocks 0 and 1, vanilla elsewhere
    myopic_kv:h=4:layers=2  strict cut beyond 4 positions, in block 2 only
    myopic:h=8:name=short   the same cut shown as "short"

Nothing outside :mod:`myopia.attention` tests ``mode``: callers ask the spec's properties
(:attr:`Cut.needs_past_kv`, :attr:`Cut.changes_forward`, :attr:`Cut.cuts_gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ATTENTION_MODES: tuple[str, ...] = ("vanilla", "myopic", "myopic_kv", "bigram")
MYOPIC_MODES: tuple[str, ...] = ("myopic", "myopic_kv")
BACKENDS: tuple[str, ...] = ("auto", "fused", "reference")

_KEYS = {"h": "horizon", "horizon": "horizon", "layers": "layers", "name": "name"}
GRAMMAR = "MODE[@BETA][:h=W][:layers=A-B][:name=NAME], e.g. myopic, myopic@0.5, myopic:h=8, myopic:layers=0-1"


class CutError(ValueError):
    """A cut spec that cannot be parsed or does not fit the model; the message names the fix."""


@dataclass(frozen=True)
class Cut:
    """A gradient cut (module docstring). Build it with :meth:`parse` or the constructor; both check it."""

    mode: str = "vanilla"
    beta: float = 0.0
    horizon: int | None = None
    layers: tuple[int, ...] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        where = f"cut {self.spec!r}" if self.mode in ATTENTION_MODES else "cut"
        if self.mode not in ATTENTION_MODES:
            raise CutError(f"attention mode {self.mode!r} is not one of {', '.join(ATTENTION_MODES)}")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise CutError(f"{where}: beta={self.beta} is outside [0, 1] (0 = myopic, 1 = vanilla gradients)")
        object.__setattr__(self, "beta", float(self.beta))
        if self.horizon is not None:
            if isinstance(self.horizon, bool) or int(self.horizon) != self.horizon or self.horizon < 0:
                raise CutError(f"{where}: horizon {self.horizon!r} must be a whole number >= 0")
            if self.mode not in MYOPIC_MODES:
                raise CutError(f"{where}: a horizon needs a myopic mode (myopic or myopic_kv), not {self.mode!r}")
            object.__setattr__(self, "horizon", int(self.horizon))
        if self.beta > 0 and self.mode not in MYOPIC_MODES:
            raise CutError(f"{where}: beta applies to myopic and myopic_kv only, not {self.mode!r}")
        if self.layers is not None:
            layers = tuple(sorted(set(int(i) for i in self.layers)))
            if not layers or layers[0] < 0:
                raise CutError(f"{where}: layers must name block indices >= 0")
            if self.mode == "vanilla":
                raise CutError(f"{where}: layers restricts a cut, and vanilla cuts nothing")
            object.__setattr__(self, "layers", layers)

    # -- text form -------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Cut) -> Cut:
        """``MODE[@BETA][:KEY=VALUE]...`` (module docstring) or a :class:`Cut` (returned as is)."""
        if isinstance(text, Cut):
            return text
        if not isinstance(text, str) or not text.strip():
            raise CutError(f"cut {text!r} is empty; write {GRAMMAR}")
        head, *options = text.strip().split(":")
        mode, _, beta_text = head.partition("@")
        fields: dict = {"mode": mode}
        try:
            if beta_text:
                fields["beta"] = float(beta_text)
        except ValueError:
            raise CutError(f"cut {text!r}: beta {beta_text!r} is not a number; write {GRAMMAR}") from None
        for option in options:
            key, eq, value = option.partition("=")
            if not eq or key not in _KEYS:
                raise CutError(f"cut {text!r}: unknown option {option!r} (known: h=W, layers=A-B, name=NAME); "
                               f"write {GRAMMAR}")
            field = _KEYS[key]
            if field in fields:
                raise CutError(f"cut {text!r}: {key} is given twice")
            fields[field] = _parse_value(text, field, value)
        try:
            return cls(**fields)
        except CutError as exc:
            raise CutError(f"cut {text!r}: {str(exc).split(': ', 1)[-1]}; write {GRAMMAR}") from None

    @property
    def spec(self) -> str:
        """The canonical text form (without the display name); ``Cut.parse(c.spec)`` gives ``c`` back."""
        text = self.mode + (f"@{self.beta:g}" if self.beta else "")
        if self.horizon is not None:
            text += f":h={self.horizon}"
        if self.layers is not None:
            text += f":layers={_format_layers(self.layers)}"
        return text

    @property
    def label(self) -> str:
        """The display name, or the canonical text form."""
        return self.name or self.spec

    def __str__(self) -> str:
        return self.spec + (f":name={self.name}" if self.name else "")

    # -- what a caller needs to know ---------------------------------------------------------------
    @property
    def is_vanilla(self) -> bool:
        """Whether nothing is cut anywhere: the ordinary forward and gradient."""
        return self.mode == "vanilla"

    @property
    def changes_forward(self) -> bool:
        """Whether the forward value differs from vanilla attention (bigram)."""
        return self.mode == "bigram"

    @property
    def cuts_gradient(self) -> bool:
        """Whether some gradient term is removed or scaled (in at least one layer)."""
        return self.mode in MYOPIC_MODES and self.beta < 1.0

    @property
    def needs_past_kv(self) -> bool:
        """Whether attention needs the past keys/values of the *detached* attention input through the
        live weights (the ``myopic`` mode's weight-only copy)."""
        return self.mode == "myopic"

    @property
    def effective_horizon(self) -> int:
        """The horizon as a number: 0 when ``None`` (every past position cut)."""
        return self.horizon or 0

    # -- resolution per layer and per sequence length ---------------------------------------------------
    def with_beta(self, beta: float) -> Cut:
        """This cut with ``beta`` (a one-line error if it already sets another)."""
        if float(beta) == self.beta:
            return self
        if self.beta:
            raise CutError(f"cut {self.spec!r} already sets beta; drop beta={beta} or the @BETA")
        return replace(self, beta=beta)

    def check_layers(self, n_layer: int, model: str = "the model") -> Cut:
        """Raise a one-line error if ``layers`` names a block ``model`` (with ``n_layer`` blocks) lacks."""
        if self.layers is not None and self.layers[-1] >= n_layer:
            raise CutError(f"cut {self.spec!r}: {model} has blocks 0-{n_layer - 1}, so layer {self.layers[-1]} "
                           f"does not exist; use layers within 0-{n_layer - 1}")
        return self

    def for_layer(self, index: int) -> Cut:
        """The cut block ``index`` applies: this cut without ``layers``, or vanilla outside them."""
        if self.layers is None:
            return self
        if index in self.layers:
            return replace(self, layers=None, name=None)
        return VANILLA

    def at_length(self, T: int) -> Cut:
        """The cut one layer applies to a window of ``T`` positions: horizon 0 is the mode's own cut
        (horizon ``None``) and horizon ≥ T − 1 crosses every edge, i.e. vanilla."""
        if self.layers is not None:
            raise CutError(f"cut {self.spec!r} names layers; resolve it per block with for_layer() first")
        if self.horizon is None:
            return self
        if self.horizon == 0:
            return replace(self, horizon=None, name=None)
        if self.horizon >= T - 1:
            return VANILLA
        return self


def _parse_value(text: str, field: str, value: str):
    if field == "name":
        if not value:
            raise CutError(f"cut {text!r}: name is empty")
        return value
    try:
        if field == "horizon":
            return int(value)
        layers: list[int] = []
        for part in value.split("+"):
            lo, dash, hi = part.partition("-")
            if dash:
                layers.extend(range(int(lo), int(hi) + 1))
                if int(hi) < int(lo):
                    raise ValueError
            else:
                layers.append(int(lo))
        return tuple(layers)
    except ValueError:
        example = "h=8" if field == "horizon" else "layers=0-1 or layers=0+2"
        raise CutError(f"cut {text!r}: {field} {value!r} is not valid; write e.g. {example}") from None


def _format_layers(layers: tuple[int, ...]) -> str:
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "+".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


VANILLA = Cut()


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise CutError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
