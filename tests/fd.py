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
