"""Gate objects: parameters and their gradients as NumPy arrays, named with the paper's symbols.

Every gate has the same small interface, used by the trainer:

* ``forward(x=None) -> w``: expert weights, (n,) for a static gate, (B, n) per example (x is the
  gate's input, (B, p); static gates ignore it, or broadcast to (B, n) with ``batch_size``).
* ``backward(dw, need_dx=True) -> dx``: accumulates into ``grads`` the gradient of <dw, w> plus
  the gate's own regularizer, and returns the gradient with respect to x (None for static gates,
  and when ``need_dx`` is False: a model whose gates read its own input skips that product).
* ``regularization() -> float``: the regularizer's value at the last forward (already scaled).
* ``params`` / ``grads``: dicts of arrays (same keys); ``zero_grad()``.
* diagnostics: ``selected_experts()`` (indices with nonzero weight) and, for DSelect-k,
  ``is_binary()`` (S(Z) all 0/1, after which at most k experts are selected).

Initialization follows the reference TensorFlow implementation: Z (and the per-example Z-map's
weights and biases) uniform in (-gamma/100, gamma/100), so 0 < S(Z) < 1 and every Z_ij has a
nonzero gradient at the start; the alpha map uniform in (-0.05, 0.05).
"""
from .dselect_k import DSelectKGate, StaticDSelectKBank
from .softmax import SoftmaxGate
from .softmax_selector import SoftmaxSelectorGate
from .top_k import TopKGate

__all__ = ["DSelectKGate", "TopKGate", "SoftmaxGate", "SoftmaxSelectorGate", "StaticDSelectKBank"]
