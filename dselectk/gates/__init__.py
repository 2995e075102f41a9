"""Gates: gate objects (parameters and gradients as NumPy arrays, named with the papers' symbols)
and gate specifications (their configurations), one file per gate.

Specs and gates
---------------
A *spec* is a small frozen dataclass holding one kind of gate's options, validated when it is made
(ValueError / TypeError saying what was wrong); it is what a model is given and what it saves::

    import dselectk as dk
    spec = dk.gates.DSelectK(k=2, gamma=1.0, entropy_reg=0.1)     # also TopK, Softmax, SoftmaxSelector
    spec.to_config()          # {'kind': 'dselect_k', 'k': 2, 'gamma': 1.0, 'entropy_reg': 0.1, ...}
    dk.gates.GateSpec.from_config(spec.to_config()) == spec
    gate = spec.build(n_experts=16, input_dim=None, rng=0, dtype="float32")    # a DSelectKGate
    model = dk.MMoE(10, n_tasks=2, gate=spec)      # or the shorthand gate="dselect_k", k=2, ...

``register`` maps each spec class's ``kind`` string ("dselect_k", "top_k", "softmax",
"softmax_selector", "comet", "hash") to the class; ``kinds()`` lists them; ``as_spec(kind, **options)`` makes the spec
of a shorthand, raising TypeError for an option that the gate does not have.

The gate interface
------------------
Every gate object has the same small interface, used by the models and the trainer:

* ``forward(x=None) -> w``: expert weights, (n,) for a static gate (x ignored), (B, n) per example
  (x is the gate's input, (B, p)).
* ``backward(dw, need_dx=True) -> dx``: accumulates into ``grads`` the gradient of <dw, w> plus
  the gate's own regularizer, and returns the gradient with respect to x (None for static gates,
  and when ``need_dx`` is False: a model whose gates read its own input skips that product).
* ``regularization() -> float``: the regularizer's value at the last forward (already scaled).
* ``params`` / ``grads``: dicts of arrays (same keys, the model moves them into its parameter slab
  and replaces them by views); ``zero_grad()``; ``per_example`` (bool); ``n_experts``.
* diagnostics of the last forward: ``expert_weights()``, ``selected_experts()`` (indices with
  nonzero weight), ``num_selected()``, and for the smooth-step gates ``is_binary()`` (S(Z) all
  0/1, after which at most k experts are selected) and ``binary_fraction()``. A static gate
  answers them before its first forward too (from its parameters: e.g. right after ``load``).
* optional: ``train(mode)`` (the models call it when present: training-only behaviour such as
  Top-k noise).

Initialization follows the reference TensorFlow implementation: Z (and the per-example Z-map's
weights and biases) uniform in (-gamma/100, gamma/100), so 0 < S(Z) < 1 and every Z_ij has a
nonzero gradient at the start; the alpha map uniform in (-0.05, 0.05). Gates and models default
to float32.

Adding a gate
-------------
A new gate lives in its own file here, ``dselectk/gates/<kind>.py``: the gate class (subclass
:class:`~dselectk.gates._base._Gate` for the shared plumbing: ``zero_grad``, the input check
``_input(x)``, ``_need_forward()``, and the diagnostics, which read ``self._last_w`` /
``self._cache`` as set by ``forward``) with the interface above, and its spec: a
``@register``-ed ``@dataclasses.dataclass(frozen=True)`` subclass of :class:`GateSpec` with
``kind = "<kind>"``, its options as fields (with defaults; a ``per_example`` field if it has
both forms), ``_check()`` returning the validated, normalised fields ({name: value}; Python ints,
floats and bools, so that ``to_config`` is JSON-able) and ``build(n_experts, input_dim, rng,
dtype)`` returning a new gate drawn from ``rng``. Then one import line in this ``__init__`` (to
register it and export its names). ``MMoE(gate="<kind>", option=...)``, ``gate=Spec(...)``,
``save`` / ``load`` and the model's config then work with no other change. What the models
expect of the gate: ``backward`` must accumulate (``+=``) into ``grads``, whose arrays are
views of the model's slab; a static gate (``per_example`` False) is called as ``forward()`` and
``backward(dw)`` with dw (n,), and MMoE's static fast path stacks the T gates' weights into a (T,
n) matrix and runs only the experts whose column has a nonzero (so exact zeros in w are what
make a static gate sparse, and an expert nobody uses costs nothing); a per-example gate is called
as ``forward(x)`` with x (B, p) C-contiguous of the model's dtype and ``backward(dw, need_dx)``
with dw (B, n), and exact zeros in w are again what conditional computation skips (each expert
runs on the rows that use it). State the gate needs beyond ``params`` (e.g. a fixed assignment)
must be derivable from the spec and the model's seed, or be saved with the model: a gate's
``buffers()`` ({name: array}, optional) are saved beside the parameters and put back on load
through its ``set_buffer(name, array)``, which validates them. A gate that routes on the ids of
the model's embedding input (hash routing) sets ``reads_ids = True`` on its spec and its gate: the
model then builds it with ``build(..., id_input=<the EmbeddingInput or None>)`` and calls
``forward(ids)`` with the (B, F) ids array instead of the feature rows.

ONNX export (``dselectk.export_onnx``): a static gate needs nothing, the base class's
``onnx_weights`` hands its weights to the exporter as constants. A per-example gate defines
``onnx_weights(graph, x)`` in its own file, building its (B, n) weights from the graph value ``x``
(B, p) with the methods of :class:`dselectk.export.OnnxGraph` (``op``, ``const``, ``linear``,
``reshape``, ``zeros_like``; standard opset-17 operators) and returning the result's name, the
inference-time forward only (no training noise); ``tests/test_onnx_export.py`` then checks it
against ``dk.predict`` once its spec is added to the test's ``GATES``.
"""
# the order of these imports is the order of kinds(): the paper's gate first
from ._base import GateSpec, as_spec, kinds, register, spec_class
from .dselect_k import DSelectK, DSelectKGate, StaticDSelectKBank
from .top_k import TopK, TopKGate
from .softmax import Softmax, SoftmaxGate
from .softmax_selector import SoftmaxSelector, SoftmaxSelectorGate
from .comet import Comet, CometGate
from .hash import Hash, HashGate

__all__ = [
    "GateSpec", "register", "kinds", "spec_class", "as_spec",
    "DSelectK", "TopK", "Softmax", "SoftmaxSelector", "Comet", "Hash",
    "DSelectKGate", "TopKGate", "SoftmaxGate", "SoftmaxSelectorGate", "StaticDSelectKBank", "CometGate", "HashGate",
]
