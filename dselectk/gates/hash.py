"""Hash routing (as in Ibrahim et al., KDD 2023): each value of an id feature is sent to one fixed
expert."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .. import functional as F
from ._base import GateSpec, Seed, _check_common, _Gate, _rng, register

__all__ = ["Hash", "HashGate"]


def balanced_assignment(vocab_size, n_experts, rng):
    """(vocab_size,) int64: a uniformly random map id -> expert under which the experts' id counts
    differ by at most one (a shuffled 0, 1, ..., n - 1, 0, 1, ...)."""
    assignment = np.empty(vocab_size, np.int64)
    assignment[rng.permutation(vocab_size)] = np.arange(vocab_size) % n_experts
    return assignment


class HashGate(_Gate):
    """Hash routing: w = onehot(assignment[id]) (k = 1), where id is the value of one integer id
    feature of the example (for the MovieLens model: the user id) and ``assignment`` (V,) maps each
    of the V ids to one expert. No trainable parameters.

    The assignment is drawn once, from ``seed``, balanced (the experts' id counts differ by at most
    one). The authors' code draws each id's expert independently and unseeded, so that its runs
    are not reproducible and its experts get unequal shares; ours is both reproducible and
    balanced. It is readable as ``gate.assignment`` and saved with a model (``buffers()``).

    In a model (``gate="hash"``) the gate reads the ids of the model's embedding input: column
    ``hash_feature`` of X["ids"]. Standalone, ``forward(ids)`` takes that column (B,) or the whole
    ids array (B, F). Weights are per example (B, n), one-hot, so a model's per-example path runs
    each expert on its own ids' examples only.

    Parameters
    ----------
    n_experts : int, n >= 2.
    vocab_size : V, the number of ids (ids are 0 .. V - 1).
    hash_feature : which column of a (B, F) ids array holds the id (default 0).
    seed : int or numpy Generator for the assignment.
    dtype : float32 (the default, as for models) or float64, the dtype of w.
    """

    per_example = True
    reads_ids = True  # models pass it their ids array instead of the feature rows
    k = 1

    def __init__(self, n_experts: int, vocab_size: int, hash_feature: int = 0, seed: Seed = None,
                 dtype: DTypeLike = np.float32) -> None:
        n, _, _, dtype = _check_common(n_experts, None, False, None, dtype)
        self.n_experts, self.dtype = n, dtype
        self.vocab_size = F._int(vocab_size, "vocab_size", 1, maximum=2**62)
        self.hash_feature = F._int(hash_feature, "hash_feature", 0)
        self.input_dim = None
        self.assignment = balanced_assignment(self.vocab_size, n, _rng(seed))
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._cache = None
        self._last_w = None

    def _config(self):
        return dict(n_experts=self.n_experts, vocab_size=self.vocab_size, hash_feature=self.hash_feature)

    def _ids(self, ids):
        if not isinstance(ids, np.ndarray) or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError("hash routing reads integer ids: a numpy.ndarray of an integer dtype, (B,) or (B, F), "
                            f"got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.ndim == 2:
            if self.hash_feature >= ids.shape[1]:
                raise ValueError(f"hash_feature = {self.hash_feature} names id column {self.hash_feature}, but the ids "
                                 f"have {ids.shape[1]} columns (shape {ids.shape})")
            ids = ids[:, self.hash_feature]
        elif ids.ndim != 1:
            raise ValueError(f"hash routing takes ids of shape (B,) or (B, F), got {ids.shape}")
        if ids.size == 0:
            raise ValueError("hash routing got an empty batch (B = 0)")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"hash routing: id {ids[i]} of example {i} (column {self.hash_feature}) is outside "
                             f"[0, {self.vocab_size}), the ids this gate's assignment covers")
        return ids

    def forward(self, ids):
        """w (B, n): one-hot rows, the expert of each example's id."""
        experts = self.assignment[self._ids(ids)]
        w = np.zeros((experts.size, self.n_experts), self.dtype)
        w[np.arange(experts.size), experts] = 1
        self._cache = (experts,)
        self._last_w = w
        return w

    def onnx_weights(self, graph: Any, x: str) -> Any:
        """w as ONNX operators on the model's id column ``hash_feature`` (not on x): the experts
        assignment[ids] (one Gather), then their rows of the identity (a second)."""
        if graph.id_columns is None:
            raise TypeError("HashGate reads the ids of an embedding input; the exported model has none")
        experts = graph.op("Gather", graph.const(self.assignment, "hash_assignment"),
                           graph.id_columns[self.hash_feature], axis=0, hint="hash_expert")  # (B,)
        return graph.op("Gather", graph.const(np.eye(self.n_experts, dtype=self.dtype), "hash_onehot"), experts, axis=0,
                        hint="hash_w")  # (B, n)

    def backward(self, dw, need_dx=True):
        """Nothing to learn, and the weights do not depend on a float input: returns None."""
        self._need_forward()
        return None

    def regularization(self):
        return 0.0

    def buffers(self):
        """The state a model saves beside its parameters: {"assignment": (V,) int64}."""
        return {"assignment": self.assignment}

    def set_buffer(self, name, value):
        """Put back a saved buffer (``load``): the assignment must be an integer array (V,) with
        every value in [0, n); ValueError otherwise."""
        if name != "assignment":
            raise ValueError(f"HashGate has no buffer {name!r} (it has 'assignment')")
        value = np.asarray(value)
        if value.shape != (self.vocab_size,) or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"a hash assignment must be an integer array of shape ({self.vocab_size},), got "
                             f"{value.dtype} {value.shape}")
        if value.size and (value.min() < 0 or value.max() >= self.n_experts):
            raise ValueError(f"a hash assignment maps ids to experts 0 .. {self.n_experts - 1}, got values in "
                             f"[{value.min()}, {value.max()}]")
        self.assignment = value.astype(np.int64)


@register
@dataclasses.dataclass(frozen=True)
class Hash(GateSpec):
    """Spec of :class:`HashGate`: ``gate=Hash(hash_feature=0)`` (or ``gate="hash"``) in a model with
    an embedding input; ``hash_feature`` is the index of the id column routed on (MovieLens: 0,
    the user id). ``k`` is always 1 (one expert per id) and is accepted only as 1. Hash routing has
    one form, per example (the id is a feature of the example)."""

    kind = "hash"
    k: int = 1
    _: dataclasses.KW_ONLY
    hash_feature: int = 0
    per_example = True
    reads_ids = True  # its build takes the model's embedding input (id_input=)

    def _check(self):
        k = F._int(self.k, "k", 1)
        if k != 1:
            raise ValueError(f"hash routing sends each id to exactly one expert: k must be 1, got k = {k}")
        return dict(k=k, hash_feature=F._int(self.hash_feature, "hash_feature", 0))

    def build(self, n_experts: int, input_dim: int | None = None, rng: Seed = None, dtype: DTypeLike = np.float32,
              id_input: Any = None) -> HashGate:
        if id_input is None:
            raise ValueError("hash routing needs an id input: build the model with embeddings=dict(vocab_sizes=..., "
                             "dims=...) (hash_feature names one of its id columns)")
        if self.hash_feature >= id_input.n_ids:
            raise ValueError(f"hash_feature = {self.hash_feature}, but the embedding input has {id_input.n_ids} id "
                             f"column(s) (0 .. {id_input.n_ids - 1})")
        return HashGate(n_experts, id_input.vocab_sizes[self.hash_feature], self.hash_feature, seed=rng, dtype=dtype)
