"""Central finite differences for the whole-model gradient tests (float64 models)."""


def check_entries(objective, data, grad, indices, tol=2e-6, h=1e-6, context=None):
    """For every flat index i in ``indices``: perturb ``data[i]`` (a 1-D view of the parameters) by
    +-h, and assert that ``grad[i]`` matches (objective(+h) - objective(-h)) / 2h within
    ``tol * max(1, |numeric|)``. ``data`` is restored after each entry."""
    for i in indices:
        old = data[i]
        data[i] = old + h
        fp = objective()
        data[i] = old - h
        fm = objective()
        data[i] = old
        num = (fp - fm) / (2 * h)
        assert abs(grad[i] - num) <= tol * max(1.0, abs(num)), (context, i, grad[i], num)


def spread_gates(model, rng):
    """Move gate parameters off their tiny initial values (and away from Top-k ties) so that
    every term of the gradient is exercised; the smooth-step gates' Z stays inside the fractional
    region (+-0.4 gamma)."""
    for g in model.gates:
        for name, v in g.params.items():
            if name == "Z":
                v[...] = rng.uniform(-0.4, 0.4, v.shape) * g.gamma
            elif name in ("W", "b_W"):
                v[...] = rng.uniform(-0.05, 0.05, v.shape) * g.gamma
            else:
                v[...] = rng.standard_normal(v.shape)
