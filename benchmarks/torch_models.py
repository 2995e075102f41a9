"""PyTorch versions of dselectk's gates and MMoE, for comparison only (parity tests, benchmarks).

The package never imports this module. It mirrors dselectk's definitions exactly, so that with the
same parameters both give the same outputs, losses and gradients (tests/test_torch_parity.py):

* :func:`smooth_step`: S(t; gamma) = 0 for t <= -gamma/2, 1 for t >= gamma/2, the cubic
  -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 in between, evaluated as the C kernel does
  (csrc/smooth_step_impl.h): u^2 (3 - 2u) with u = (gamma/2 + t) / gamma for t < 0 and its mirror
  for t >= 0, exactly 0 or 1 (and slope 0) where min(S, 1 - S) is at most half the spacing of the
  numbers below 1.
* :func:`selector`: r_j = prod_b (s_b if bit b of j is set else 1 - s_b), with s[..., 0] the least
  significant bit (``dselectk.functional.selector``); codes n..2^m-1 dropped when n is not a power
  of two.
* :class:`DSelectKGate`: w = sum_i softmax(alpha)_i r(S(z^(i))), static (alpha (k,), Z (k, m)) or
  per example (G (k, p), b_G (k,), W (k, m, p), b_W (k, m)). Its regularizer is
  lambda * Omega + xi * penalty with Omega = sum_i h(r_i), h(r) = -sum_j r_j log(r_j + eps), and
  penalty = sum_i 1 / (eps + sum_{j<n} r_ij), each averaged over the batch (B = 1 for a static
  gate); xi counts only when n is not a power of two (``dselectk.functional.dselect_k_backward``).
* :class:`CometGate`: the COMET gate (``dselectk.functional.comet_forward``): k heap-indexed trees,
  node logits Z (k, n - 1), leaf logits A (k, n) in left-first depth-first leaf order, reach
  probabilities level by level down the heap, one softmax over the k n scores a + log p computed
  as p exp(a - amax) / sum (no log, so reach 0 gives weight 0 and a finite gradient), w = sum over
  trees; static (A, Z) or per example (U (k, n, p), b_U (k, n), W (k, n - 1, p), b_W (k, n - 1)).
  Regularizer lambda * mean_b sum_t -sum_j p log(p + eps).
* :class:`TopKGate`: softmax over the k largest logits (ties to the lower index), 0 elsewhere;
  static (logits (n,)) or per example (A (n, p), b (n,)). No noisy variant.
* :class:`MMoE`: n experts of Dense -> ReLU blocks, one gate per task (its input is the model's
  input), towers of Dense -> ReLU blocks and a linear output. Dense keeps W as (in, out) like
  ``dselectk.layers.Dense``. Losses: "mse" (per example the sum over the outputs, mean over the
  batch) and "bce" (with logits, mean); total = sum_t task_weight_t * L_t + the gates'
  regularizers (``dselectk.models._Model.loss``). No dropout.
* :func:`from_dselectk` builds the PyTorch model of a ``dselectk.MMoE`` and copies its parameters;
  :func:`copy_parameters` copies them into an existing one. ``model.dsk_params`` maps dselectk's
  parameter names (``model.parameters()`` of dselectk, e.g. "expert3.0.W", "gate1.Z") to the
  torch Parameters.
* :func:`make_adam`: ``torch.optim.Adam`` over the model's parameters.
* :class:`CNNMMoE`: the Multi-MNIST models of ``dselectk.experiments.multi_mnist`` (Appendix D.2)
  with static softmax gates (the softmax MoE baseline) or a shared CNN bottom (``n_experts=None``):
  CNN experts conv 5x5 -> ReLU -> max-pool 2 -> conv 5x5 -> ReLU -> max-pool 2 -> flatten ->
  Dense-ReLU layers, towers of Dense-ReLU layers and a 10-class output, the sum of the tasks'
  softmax cross-entropies. :func:`cnn_from_dselectk` builds one from a dselectk model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["smooth_step", "selector", "n_bits", "DSelectKGate", "CometGate", "TopKGate", "Dense", "MLP", "MMoE",
           "from_dselectk", "copy_parameters", "make_adam", "task_loss", "CNNMMoE", "cnn_from_dselectk"]

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def n_bits(n):
    """m = ceil(log2 n)."""
    return (int(n) - 1).bit_length()


def smooth_step(t, gamma=1.0):
    tol = torch.finfo(t.dtype).eps / 4  # half the spacing of the numbers just below 1
    u = ((gamma / 2 + t) / gamma).clamp(0.0, 0.5)  # t < 0: S = u^2 (3 - 2u)
    v = ((gamma / 2 - t) / gamma).clamp(0.0, 0.5)  # t >= 0: 1 - S = v^2 (3 - 2v)
    low, high = u * u * (3 - 2 * u), v * v * (3 - 2 * v)
    s = torch.where(t < 0, low, 1 - high)
    saturated = torch.where(t < 0, low, high) <= tol
    return torch.where(saturated, (t >= 0).to(t.dtype), s)


def selector(s, n):
    """s (..., m) -> r (..., n): built bit by bit, r <- [r * (1 - s_b), r * s_b], so that index j's
    bit b selects s_b (bit 0 least significant); O(2^m) per row."""
    m = s.shape[-1]
    r = torch.ones(s.shape[:-1] + (1,), dtype=s.dtype, device=s.device)
    for b in range(m):
        sb = s[..., b:b + 1]
        r = torch.cat([r * (1 - sb), r * sb], dim=-1)
    return r[..., :n] if r.shape[-1] != n else r


class DSelectKGate(nn.Module):
    def __init__(self, n_experts, k, gamma=1.0, entropy_reg=0.0, xi=1.0, per_example=False, input_dim=None,
                 eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.n, self.k, self.gamma = int(n_experts), int(k), float(gamma)
        self.m = n_bits(self.n)
        self.entropy_reg, self.eps = float(entropy_reg), float(eps)
        self.xi = 0.0 if (1 << self.m) == self.n else float(xi)  # the penalty only for n not a power of two
        self.per_example = bool(per_example)
        k, m = self.k, self.m
        if self.per_example:
            p = int(input_dim)
            self.G = nn.Parameter(torch.zeros(k, p, dtype=dtype))
            self.b_G = nn.Parameter(torch.zeros(k, dtype=dtype))
            self.W = nn.Parameter(torch.zeros(k, m, p, dtype=dtype))
            self.b_W = nn.Parameter(torch.zeros(k, m, dtype=dtype))
        else:
            self.alpha = nn.Parameter(torch.zeros(k, dtype=dtype))
            self.Z = nn.Parameter(torch.zeros(k, m, dtype=dtype))
        self.reg = None

    def forward(self, x=None):
        """w (n,) static, (B, n) per example; sets ``self.reg`` (a 0-d tensor) to the regularizer."""
        if self.per_example:
            alpha = nn.functional.linear(x, self.G, self.b_G)  # (B, k)
            Z = nn.functional.linear(x, self.W.reshape(self.k * self.m, -1), self.b_W.reshape(-1))
            Z = Z.reshape(-1, self.k, self.m)
        else:
            alpha, Z = self.alpha[None], self.Z[None]
        sigma = torch.softmax(alpha, dim=-1)  # (B, k)
        r = selector(smooth_step(Z, self.gamma), self.n)  # (B, k, n)
        w = torch.bmm(sigma.unsqueeze(1), r).squeeze(1)  # (B, n)
        B = r.shape[0]
        reg = None
        if self.entropy_reg > 0:
            reg = -self.entropy_reg / B * (r * torch.log(r + self.eps)).sum()
        if self.xi > 0:
            pen = self.xi / B * (1.0 / (self.eps + r.sum(dim=-1))).sum()
            reg = pen if reg is None else reg + pen
        self.reg = reg
        return w if self.per_example else w[0]


def comet_leaf_nodes(n):
    """The heap index of expert j's leaf (j-th leaf in left-first depth-first order)."""
    leaves = []

    def visit(node):
        if node >= n - 1:
            leaves.append(node)
        else:
            visit(2 * node + 1)
            visit(2 * node + 2)
    visit(0)
    return leaves


class CometGate(nn.Module):
    def __init__(self, n_experts, k, gamma=1.0, entropy_reg=0.0, per_example=False, input_dim=None, eps=1e-6,
                 dtype=torch.float32):
        super().__init__()
        self.n, self.k, self.gamma = int(n_experts), int(k), float(gamma)
        self.entropy_reg, self.eps, self.per_example = float(entropy_reg), float(eps), bool(per_example)
        n, k = self.n, self.k
        if self.per_example:
            p = int(input_dim)
            self.U = nn.Parameter(torch.zeros(k, n, p, dtype=dtype))
            self.b_U = nn.Parameter(torch.zeros(k, n, dtype=dtype))
            self.W = nn.Parameter(torch.zeros(k, n - 1, p, dtype=dtype))
            self.b_W = nn.Parameter(torch.zeros(k, n - 1, dtype=dtype))
        else:
            self.A = nn.Parameter(torch.zeros(k, n, dtype=dtype))
            self.Z = nn.Parameter(torch.zeros(k, n - 1, dtype=dtype))
        self.register_buffer("leaf", torch.tensor(comet_leaf_nodes(n)), persistent=False)
        self.reg = None

    def reach(self, s):
        """s (B, k, n - 1) -> reach of every node (B, k, 2n - 1) in heap order, one level at a time:
        the internal nodes of a level are a prefix of it, and their children, in heap order, are a
        prefix of the next level."""
        n = self.n
        levels = [torch.ones(s.shape[:-1] + (1,), dtype=s.dtype)]
        start = 0
        while start < n - 1:
            level = levels[-1]
            n_int = min(n - 1 - start, level.shape[-1])
            p, sv = level[..., :n_int], s[..., start:start + n_int]
            levels.append(torch.stack([p * sv, p * (1 - sv)], dim=-1).reshape(s.shape[:-1] + (2 * n_int,)))
            start += level.shape[-1]
        return torch.cat(levels, dim=-1)

    def forward(self, x=None):
        """w (n,) static, (B, n) per example; sets ``self.reg`` to the regularizer (or None)."""
        if self.per_example:
            A = nn.functional.linear(x, self.U.reshape(self.k * self.n, -1), self.b_U.reshape(-1))
            A = A.reshape(-1, self.k, self.n)
            Z = nn.functional.linear(x, self.W.reshape(self.k * (self.n - 1), -1), self.b_W.reshape(-1))
            Z = Z.reshape(-1, self.k, self.n - 1)
        else:
            A, Z = self.A[None], self.Z[None]
        p = self.reach(smooth_step(Z, self.gamma))[..., self.leaf]  # (B, k, n), expert order
        B = p.shape[0]
        reached = p > 0
        with torch.no_grad():  # the softmax's shift: the largest logit of a reached leaf
            amax = torch.where(reached, A, -torch.inf).amax(dim=(1, 2), keepdim=True)
        # exp(-inf) = 0 where p = 0: no overflow there, and no 0 * inf in the backward
        e = p * torch.exp(torch.where(reached, A - amax, -torch.inf))
        g = e / e.sum(dim=(1, 2), keepdim=True)
        w = g.sum(dim=1)
        self.reg = (-self.entropy_reg / B * (p * torch.log(p + self.eps)).sum()) if self.entropy_reg > 0 else None
        return w if self.per_example else w[0]


def keep_top_k_softmax(logits, k):
    """softmax over the k largest entries of the last axis, 0 elsewhere; ties to the lower index
    (a stable descending sort keeps equal entries in index order)."""
    idx = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]
    p = torch.softmax(torch.gather(logits, -1, idx), dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, p)


class TopKGate(nn.Module):
    def __init__(self, n_experts, k, per_example=False, input_dim=None, dtype=torch.float32):
        super().__init__()
        self.n, self.k, self.per_example = int(n_experts), int(k), bool(per_example)
        if self.per_example:
            self.A = nn.Parameter(torch.zeros(self.n, int(input_dim), dtype=dtype))
            self.b = nn.Parameter(torch.zeros(self.n, dtype=dtype))
        else:
            self.logits = nn.Parameter(torch.zeros(self.n, dtype=dtype))
        self.reg = None

    def forward(self, x=None):
        logits = nn.functional.linear(x, self.A, self.b) if self.per_example else self.logits
        return keep_top_k_softmax(logits, self.k)


class Dense(nn.Module):
    """y = x W + b with W (in, out), as dselectk.layers.Dense."""

    def __init__(self, in_dim, out_dim, dtype=torch.float32):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(int(in_dim), int(out_dim), dtype=dtype))
        self.b = nn.Parameter(torch.zeros(int(out_dim), dtype=dtype))

    def forward(self, x):
        return torch.addmm(self.b, x, self.W)


class MLP(nn.Module):
    """Dense -> ReLU blocks, then an optional linear output (``output_dim``) or "sum" of the units.
    ``named_dense`` gives dselectk's layer indices (a ReLU counts as one layer there)."""

    def __init__(self, in_dim, units, output_dim=None, dtype=torch.float32):
        super().__init__()
        self.hidden = nn.ModuleList()
        self.named_dense = []
        d = int(in_dim)
        for i, u in enumerate(units):
            layer = Dense(d, u, dtype)
            self.hidden.append(layer)
            self.named_dense.append((2 * i, layer))
            d = int(u)
        self.sum_output = output_dim == "sum"
        self.out = None
        if output_dim is not None and not self.sum_output:
            self.out = Dense(d, output_dim, dtype)
            self.named_dense.append((2 * len(units), self.out))
            d = int(output_dim)
        self.out_dim = 1 if self.sum_output else d

    def forward(self, x):
        for layer in self.hidden:
            x = torch.relu(layer(x))
        if self.sum_output:
            return x.sum(dim=1, keepdim=True)
        return self.out(x) if self.out is not None else x


def task_loss(name, out, y):
    if name == "mse":
        return ((out - y.reshape(out.shape)) ** 2).sum(dim=1).mean()
    if name == "bce":
        return nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1))
    raise ValueError(f"torch_models supports the losses 'mse' and 'bce', not {name!r}")


class MMoE(nn.Module):
    """The MMoE of dselectk.models.MMoE (no dropout, no noisy Top-k, no softmax gates)."""

    def __init__(self, input_dim, n_tasks=2, n_experts=8, expert_units=(64,), tower_units=(32,), task_losses="mse",
                 task_outputs=1, task_weights=None, gate="dselect_k", k=2, gamma=1.0, entropy_reg=0.0, xi=1.0,
                 per_example=False, expert_output=None, dtype="float32"):
        super().__init__()
        dt = TORCH_DTYPES[str(dtype)] if not isinstance(dtype, torch.dtype) else dtype

        def per_task(v):
            return list(v) if isinstance(v, (list, tuple)) else [v] * n_tasks

        self.n_tasks = int(n_tasks)
        self.task_losses = per_task(task_losses)
        self.task_outputs = [int(o) for o in per_task(task_outputs)]
        self.task_weights = [1.0] * n_tasks if task_weights is None else [float(w) for w in per_task(task_weights)]
        self.per_example = bool(per_example)
        self.experts = nn.ModuleList(MLP(input_dim, expert_units, expert_output, dt) for _ in range(n_experts))
        d = self.experts[0].out_dim
        if gate == "dselect_k":
            make = lambda: DSelectKGate(n_experts, k, gamma, entropy_reg, xi, per_example, input_dim, dtype=dt)  # noqa: E731
        elif gate == "top_k":
            make = lambda: TopKGate(n_experts, k, per_example, input_dim, dtype=dt)  # noqa: E731
        else:
            raise ValueError(f"torch_models supports the gates 'dselect_k' and 'top_k', not {gate!r}")
        self.gates = nn.ModuleList(make() for _ in range(n_tasks))
        self.towers = nn.ModuleList(
            MLP(d, tower_units, out, dt) if tower_units is not None else MLP(d, (), None, dt) for out in self.task_outputs)
        self.dsk_params = {}
        for j, e in enumerate(self.experts):
            self._name_mlp(f"expert{j}", e)
        for t, g in enumerate(self.gates):
            for name, p in g.named_parameters():
                self.dsk_params[f"gate{t}.{name}"] = p
        for t, tw in enumerate(self.towers):
            self._name_mlp(f"tower{t}", tw)

    def _name_mlp(self, prefix, mlp):
        for i, layer in mlp.named_dense:
            self.dsk_params[f"{prefix}.{i}.W"] = layer.W
            self.dsk_params[f"{prefix}.{i}.b"] = layer.b

    def forward(self, X):
        """[raw output per task]."""
        if self.per_example:
            f = torch.stack([e(X) for e in self.experts], dim=1)  # (B, n, d)
            return [tower(torch.bmm(gate(X).unsqueeze(1), f).squeeze(1)) for gate, tower in zip(self.gates, self.towers)]
        f = torch.stack([e(X) for e in self.experts])  # (n, B, d)
        n, B, d = f.shape
        W = torch.stack([g() for g in self.gates])  # (T, n)
        mixed = (W @ f.reshape(n, B * d)).reshape(self.n_tasks, B, d)
        return [tower(mixed[t]) for t, tower in enumerate(self.towers)]

    def regularization(self):
        regs = [g.reg for g in self.gates if g.reg is not None]
        return sum(regs) if regs else None

    def loss(self, outputs, targets):
        """(total, [loss per task]) as 0-d tensors; call after forward."""
        per_task = [task_loss(name, out, y) for name, out, y in zip(self.task_losses, outputs, targets)]
        total = sum(w * L for w, L in zip(self.task_weights, per_task))
        reg = self.regularization()
        return (total + reg if reg is not None else total), per_task


_MODEL_KEYS = ("input_dim", "n_tasks", "n_experts", "expert_units", "tower_units", "task_losses", "task_outputs",
               "task_weights", "expert_output")
_GATE_KEYS = ("k", "gamma", "entropy_reg", "xi", "per_example")  # of the dselect_k and top_k gate configs


def copy_parameters(torch_model, dsk_model):
    """Copy every parameter of the dselectk model into the torch model (cast to its dtype)."""
    named = dsk_model.parameters()
    if set(named) != set(torch_model.dsk_params):
        raise ValueError(f"parameter names differ: only dselectk {sorted(set(named) - set(torch_model.dsk_params))}, "
                         f"only torch {sorted(set(torch_model.dsk_params) - set(named))}")
    with torch.no_grad():
        for name, p in torch_model.dsk_params.items():
            src = torch.from_numpy(named[name].copy())
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{name}: dselectk shape {tuple(src.shape)}, torch shape {tuple(p.shape)}")
            p.copy_(src)
    return torch_model


def from_dselectk(dsk_model, dtype=None):
    """A torch MMoE with the architecture and the parameters of ``dsk_model`` (a dselectk.MMoE);
    dtype: "float32"/"float64" or a torch dtype, default the dselectk model's."""
    cfg, gate = dsk_model.config, dsk_model.gate_spec.to_config()
    if cfg.get("dropout", 0) or gate.get("noisy"):
        raise ValueError("torch_models has no dropout and no noisy Top-k")
    kwargs = {key: cfg[key] for key in _MODEL_KEYS if key in cfg}
    kwargs.update(gate=gate["kind"], **{key: gate[key] for key in _GATE_KEYS if key in gate})
    model = MMoE(**kwargs, dtype=dtype or cfg["dtype"])
    return copy_parameters(model, dsk_model)


class CNNExpert(nn.Module):
    """dselectk.layers.CNNExpert: conv -> ReLU -> max-pool per filter count, flatten, Dense-ReLU."""

    def __init__(self, input_shape, units, filters=(10, 20), kernel=5, pool=2, dtype=torch.float32):
        super().__init__()
        c, h, w = input_shape
        self.convs = nn.ModuleList()
        for f in filters:
            self.convs.append(nn.Conv2d(c, f, kernel, dtype=dtype))
            c, h, w = f, (h - kernel + 1) // pool, (w - kernel + 1) // pool
        self.pool = pool
        self.mlp = MLP(c * h * w, units, None, dtype)
        self.out_dim = self.mlp.out_dim

    def forward(self, x):
        for conv in self.convs:
            x = nn.functional.max_pool2d(torch.relu(conv(x)), self.pool)
        return self.mlp(x.flatten(1))

    def name_parameters(self, prefix, named):
        """dselectk's names: conv i is layer 3 i (conv, ReLU, pool), the flatten one more."""
        for i, conv in enumerate(self.convs):
            named[f"{prefix}.{3 * i}.W"], named[f"{prefix}.{3 * i}.b"] = conv.weight, conv.bias
        first = 3 * len(self.convs) + 1
        for i, layer in self.mlp.named_dense:
            named[f"{prefix}.{first + i}.W"], named[f"{prefix}.{first + i}.b"] = layer.W, layer.b


class CNNMMoE(nn.Module):
    """MMoE of ``n_experts`` CNN experts with a static softmax gate per task (w_t = softmax(logits_t)
    mixes all experts), or with ``n_experts=None`` the shared-bottom model (one CNN for all
    tasks); towers of ``tower_units`` Dense-ReLU layers and a ``n_classes`` output per task."""

    def __init__(self, input_shape, n_experts=8, expert_units=(50,), tower_units=(50, 50), n_classes=(10, 10),
                 filters=(10, 20), kernel=5, pool=2, dtype=torch.float32):
        super().__init__()
        self.shared = n_experts is None
        self.experts = nn.ModuleList(CNNExpert(input_shape, expert_units, filters, kernel, pool, dtype)
                                     for _ in range(1 if self.shared else n_experts))
        self.logits = nn.ParameterList() if self.shared else nn.ParameterList(
            nn.Parameter(torch.zeros(n_experts, dtype=dtype)) for _ in n_classes)
        d = self.experts[0].out_dim
        self.towers = nn.ModuleList(MLP(d, tower_units, c, dtype) for c in n_classes)
        self.dsk_params = {}
        if self.shared:
            self.experts[0].name_parameters("bottom", self.dsk_params)
        for j, e in enumerate([] if self.shared else self.experts):
            e.name_parameters(f"expert{j}", self.dsk_params)
        for t, p in enumerate(self.logits):
            self.dsk_params[f"gate{t}.logits"] = p
        for t, tw in enumerate(self.towers):
            for i, layer in tw.named_dense:
                self.dsk_params[f"tower{t}.{i}.W"], self.dsk_params[f"tower{t}.{i}.b"] = layer.W, layer.b

    def forward(self, X):
        if self.shared:
            h = self.experts[0](X)
            return [tower(h) for tower in self.towers]
        f = torch.stack([e(X) for e in self.experts])  # (n, B, d)
        n, B, d = f.shape
        W = torch.softmax(torch.stack(list(self.logits)), dim=1)  # (T, n)
        mixed = (W @ f.reshape(n, B * d)).reshape(len(self.towers), B, d)
        return [tower(mixed[t]) for t, tower in enumerate(self.towers)]

    def loss(self, outputs, labels):
        """The sum of the tasks' mean softmax cross-entropies."""
        return sum(nn.functional.cross_entropy(out, y) for out, y in zip(outputs, labels))


def cnn_from_dselectk(dsk_model, expert_units=(50,), tower_units=(50, 50)):
    """The CNNMMoE (softmax gates) or shared-bottom twin of a dselectk model built by
    ``dselectk.experiments.multi_mnist.build_model("softmax" | "shared_bottom", ...)`` with the
    default filters, kernel and pooling, and its parameters."""
    shared = not hasattr(dsk_model, "gates") or not dsk_model.gates
    model = CNNMMoE(dsk_model.input_shape, None if shared else dsk_model.n_experts, expert_units, tower_units)
    return copy_parameters(model, dsk_model)


def make_adam(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None):
    """torch.optim.Adam over the model's parameters. ``fused=None`` asks for the fused CPU kernel
    when this PyTorch has one (one kernel for all parameters, as dselectk's single C call), else
    the default implementation. The chosen variant is in ``opt.variant``."""
    variants = [("fused", dict(fused=True)), ("foreach", dict(foreach=True)), ("default", {})]
    if fused is not None:
        variants = [("fused" if fused else "default", dict(fused=bool(fused)))]
    for variant, extra in variants:
        try:
            opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   **extra)
        except (RuntimeError, TypeError, ValueError):
            continue
        opt.variant = variant
        return opt
    raise RuntimeError("torch.optim.Adam could not be built")


def num_parameters(model):
    return sum(math.prod(p.shape) for p in model.parameters())
