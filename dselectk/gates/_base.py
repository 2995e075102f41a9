"""Shared gate plumbing: argument checks, initialisation helpers and the :class:`_Gate` base."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar, Union

import numpy as np
from numpy.typing import DTypeLike

from .. import functional as F
from ..functional import _flag, _number  # the shared scalar checks, re-exported to the gate modules
from .._memory import check_gate

_DTYPES = (np.float32, np.float64)

Seed = Union[int, np.random.Generator, None]  # what gates and specs take to draw their parameters


def _in_dtype(value, name, dtype):
    """ValueError unless ``value`` (a checked float that the gate's initial parameters scale with)
    is finite in the gate's dtype: gamma = 1e308 made a float32 gate's Z inf."""
    with np.errstate(over="ignore"):
        if not np.isfinite(dtype.type(value)):
            raise ValueError(f"{name} = {value!r} is beyond the range of the gate's dtype {dtype} "
                             f"(at most {float(np.finfo(dtype).max):.4g})")


def _check_common(n_experts, k, per_example, input_dim, dtype):
    n = F._int(n_experts, "n_experts", 2)
    if k is not None:
        k = F._int(k, "k", 1)
        if k > n:
            raise ValueError(f"k must satisfy 1 <= k <= n_experts = {n}, got k = {k}")
    if per_example:
        if input_dim is None:
            raise ValueError("a per-example gate needs input_dim (the size p of its input x)")
        input_dim = F._int(input_dim, "input_dim", 1)
    dtype = np.dtype(dtype)
    if dtype.type not in _DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    check_gate(n, k, dtype)  # refuse sizes that cannot fit before allocating
    return n, k, input_dim, dtype


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _logits_params(rng, n, per_example, input_dim, dtype):
    """Parameters of the logits a = A x + b (per example: A uniform in (-0.05, 0.05), b zeros) or of
    static logits (zeros), as the Top-k and softmax gates use them."""
    if per_example:
        return {"A": rng.uniform(-0.05, 0.05, (n, input_dim)).astype(dtype), "b": np.zeros(n, dtype)}
    return {"logits": np.zeros(n, dtype)}


class _Gate:
    """Shared plumbing: parameters, gradients, input checks."""

    per_example: bool
    n_experts: int

    def zero_grad(self):
        for g in self.grads.values():
            g.fill(0)

    def _accumulate(self, name, value):
        self.grads[name] += value

    def _input(self, x):
        if not self.per_example:
            return None
        if x is None:
            raise ValueError(f"{type(self).__name__}(per_example=True) needs its input x of shape (B, {self.input_dim})")
        if not isinstance(x, np.ndarray) or x.dtype.newbyteorder("=") != self.dtype:  # the kernels copy swapped x
            raise TypeError(f"x must be a numpy.ndarray of dtype {self.dtype}, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape (B, {self.input_dim}), got {x.shape}")
        return x

    def _need_forward(self):
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")

    def _last_forward(self):
        """(w, cache) of the last forward, for the diagnostics. A static gate that has not run one
        (e.g. just loaded) computes them now from its parameters, on which alone its weights
        depend, and does not keep them: backward() still needs a forward of its own."""
        if self._cache is not None:
            return self._last_w, self._cache
        if self.per_example:
            raise RuntimeError(f"{type(self).__name__}(per_example=True) has not run forward(x) yet, and its weights "
                               "depend on the input x: run a forward first (for a model: model.forward(X))")
        return self._forward_detached()

    def _forward_detached(self):
        """(w, cache) of a forward of a static gate from its parameters now, leaving the state of
        the last forward (what backward() uses) as it was."""
        kept = self._cache, self._last_w
        try:
            w = self.forward()
            return w, self._cache
        finally:
            self._cache, self._last_w = kept

    def onnx_weights(self, graph: Any, x: str) -> Any:
        """The gate's expert weights in an ONNX graph that :func:`dselectk.export_onnx` is building:
        for a static gate (this version), its weights from its parameters now, an (n,) NumPy array
        that the exporter folds in as a constant (leaving out experts whose weight is exactly zero
        in every task). A per-example gate overrides this in its own file: it builds its (B, n)
        weights from ``x``, the graph name of its (B, p) input, with the methods of ``graph`` (a
        :class:`dselectk.export.OnnxGraph`) and returns the name of the result."""
        if self.per_example:
            raise TypeError(f"{type(self).__name__}(per_example=True) has no ONNX export: its file must define "
                            "onnx_weights(graph, x) (see dselectk.gates, 'Adding a gate')")
        return np.array(self._forward_detached()[0], copy=True)

    def expert_weights(self):
        """The expert weights of the last forward: (n,) static, (B, n) per example (a static gate
        before its first forward: its weights now)."""
        return self._last_forward()[0]

    def selected_experts(self, tol=0.0):
        """Indices of the experts with weight > tol at the last forward: for a per-example gate,
        those used by at least one example of the last batch."""
        w = self.expert_weights()
        return np.flatnonzero((w > tol) if w.ndim == 1 else (w > tol).any(axis=0))

    def num_selected(self, tol=0.0):
        """Number of experts with weight > tol, averaged over the examples of the last batch."""
        w = self.expert_weights()
        return float((w > tol).sum()) if w.ndim == 1 else float((w > tol).sum(axis=1).mean())

    def __repr__(self):
        extra = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({extra})"


# -- gate specifications -----------------------------------------------------------------------

_REGISTRY: dict[str, type[GateSpec]] = {}
S = TypeVar("S", bound="GateSpec")


def register(spec_class: type[S]) -> type[S]:
    """Class decorator: makes ``spec_class`` (a :class:`GateSpec` subclass with a ``kind``) known
    by its kind string, for ``MMoE(gate="<kind>", ...)``, :meth:`GateSpec.from_config` and ``load``."""
    if not (isinstance(spec_class, type) and issubclass(spec_class, GateSpec)):
        raise TypeError(f"register() takes a GateSpec subclass, got {spec_class!r}")
    kind = spec_class.kind
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{spec_class.__name__}.kind must be a non-empty string, got {kind!r}")
    known = _REGISTRY.get(kind)
    if known is not None and known.__qualname__ != spec_class.__qualname__:
        raise ValueError(f"gate kind {kind!r} is already registered by {known.__module__}.{known.__qualname__}")
    _REGISTRY[kind] = spec_class
    return spec_class


def kinds() -> tuple[str, ...]:
    """The registered gate kinds, e.g. ('dselect_k', 'top_k', 'softmax', 'softmax_selector')."""
    return tuple(_REGISTRY)


def spec_class(kind: str) -> type[GateSpec]:
    """The GateSpec subclass registered for ``kind``."""
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):  # TypeError: an unhashable kind
        raise ValueError(f"unknown gate {kind!r}; expected one of {kinds()}") from None


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """The configuration of one kind of gate, not the gate itself: immutable, validated when it is
    made, JSON-able through :meth:`to_config` / :meth:`from_config`, and turned into a gate (with
    fresh parameters) by :meth:`build`. A model builds one gate per task from its spec.

    Subclasses are frozen dataclasses whose fields are the gate's options; they set ``kind``,
    validate (and normalise) their fields in ``_check`` and implement ``build``."""

    kind: ClassVar[str] = ""
    # Static by default; a field of the specs whose gate has both forms. Unannotated here: an
    # annotation would make the dataclass machinery put that field first in every subclass.
    per_example = False

    def __post_init__(self):
        for name, value in self._check().items():
            object.__setattr__(self, name, value)  # normalised: ints as int, reals as float

    def _check(self):
        """{field: normalised value}; raises TypeError / ValueError for a bad value."""
        return {}

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The gate's option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_config(self) -> dict[str, Any]:
        """A JSON-able dict: {"kind": ..., option: value, ...}."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in self.options()}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GateSpec:
        """The spec of ``config`` (a dict from :meth:`to_config`). Called on GateSpec itself, the
        "kind" key picks the class; on a subclass, it must name that class's kind. Options left out
        take their defaults; an unknown key or a bad value raises ValueError (a config is data)."""
        if not isinstance(config, dict):
            raise TypeError(f"a gate config must be a dict with a 'kind' key, got {type(config).__name__}")
        if "kind" not in config:
            raise ValueError(f"a gate config needs a 'kind' key (one of {kinds()}), got keys {sorted(config)}")
        target = spec_class(config["kind"])
        if cls is not GateSpec and target is not cls:
            raise ValueError(f"{cls.__name__}.from_config() got a config of kind {config['kind']!r}, "
                             f"expected {cls.kind!r}")
        options = {key: value for key, value in config.items() if key != "kind"}
        unknown = sorted(set(options) - set(target.options()), key=str)
        if unknown:
            raise ValueError(f"the {target.kind!r} gate config has unknown keys {unknown}; its options are "
                             f"{', '.join(target.options())}")
        try:
            return target(**options)
        except TypeError as exc:
            raise ValueError(f"the {target.kind!r} gate config is invalid: {exc}") from None

    def replace(self: S, **changes: Any) -> S:
        """A copy with some options changed (validated again)."""
        unknown = sorted(set(changes) - set(self.options()))
        if unknown:
            raise TypeError(f"the {self.kind!r} gate has no option {', '.join(map(repr, unknown))}; its options "
                            f"are {', '.join(self.options())}")
        return dataclasses.replace(self, **changes)

    def build(self, n_experts: int, input_dim: int | None = None, rng: Seed = None,
              dtype: DTypeLike = np.float32) -> _Gate:
        """A new gate over ``n_experts`` experts (reading inputs of size ``input_dim`` if per
        example), initialised from ``rng`` (a numpy Generator, a seed or None), of ``dtype``."""
        raise NotImplementedError


def _options_text(spec_cls):
    return ", ".join(spec_cls.options()) or "none"


def resolve(gate, options=None, caller=None):
    """The GateSpec that ``gate`` stands for: a GateSpec (as is), a config dict (from_config) or a
    kind string whose options are ``options`` (validated against that gate's spec: an option the
    gate does not have raises TypeError naming the gate and its options). ``caller`` names the
    model in messages, whose unexpected keyword arguments ``options`` are."""
    options = dict(options or {})
    who = f"{caller}()" if caller else "as_spec()"
    if isinstance(gate, str):
        cls = spec_class(gate)
        unknown = [name for name in options if name not in cls.options()]
        if unknown:
            names = ", ".join(map(repr, unknown))
            if len(unknown) > 1:
                what = f"they are neither {caller} arguments nor options" if caller else "they are not options"
            else:
                what = f"it is neither an {caller} argument nor an option" if caller else "it is not an option"
            raise TypeError(f"{who} got unexpected keyword argument{'s' * (len(unknown) > 1)} {names}: {what} of "
                            f"the {gate!r} gate, whose options are {_options_text(cls)}")
        return cls(**options)
    if isinstance(gate, (GateSpec, dict)):
        if options:
            names = ", ".join(map(repr, options))
            raise TypeError(f"{who} got a gate spec and loose gate options {names} beside it: put the options "
                            f"inside the spec (e.g. spec.replace({next(iter(options))}=...)), or pass gate as a "
                            "kind string")
        return gate if isinstance(gate, GateSpec) else GateSpec.from_config(gate)
    raise TypeError(f"gate must be a gate spec (e.g. dselectk.gates.DSelectK(k=2)), a config dict or one of the "
                    f"kind strings {kinds()}, got {type(gate).__name__}")


def as_spec(gate: GateSpec | dict | str, **options: Any) -> GateSpec:
    """The GateSpec for ``gate`` (a spec, a config dict or a kind string) and, with a kind string,
    that gate's options: ``as_spec("top_k", k=2, noisy=True, per_example=True)``."""
    return resolve(gate, options)
