"""The search space: grid checks, the JSON form of configurations, the random sample of
configurations and the trials' seeds and keys (all deterministic functions of the grid and the
sweep's seed, so that a rerun plans exactly the same trials)."""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import random

import numpy as np


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def _json_value(value, where):
    """A grid value as the JSON-compatible value that is hashed, recorded and given to trial_fn."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: grid values must be finite, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys in grid values must be str, got {k!r}")
        return {k: _json_value(v, where) for k, v in value.items()}
    raise TypeError(
        f"{where}: grid values must be JSON-like (None, bool, int, float, str, or lists/dicts of them) so "
        f"that configurations can be hashed and recorded, got {type(value).__name__} {value!r}"
    )


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_grid(grid):
    if not isinstance(grid, dict):
        raise TypeError(f"grid must be a dict of name -> list of values, got {type(grid).__name__}")
    if not grid:
        raise ValueError("grid must name at least one hyperparameter, got an empty dict")
    names, values = [], []
    for name, options in grid.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"grid keys must be non-empty str, got {name!r}")
        if isinstance(options, np.ndarray):
            options = options.tolist()
        if isinstance(options, (str, bytes, dict)) or not isinstance(options, (list, tuple, range)):
            raise TypeError(f"grid[{name!r}] must be a list of values, got {type(options).__name__} {options!r}")
        if len(options) == 0:
            raise ValueError(f"grid[{name!r}] is empty: give at least one value")
        normalized = [_json_value(v, f"grid[{name!r}]") for v in options]
        seen = set()
        for v in normalized:
            c = _canonical(v)
            if c in seen:
                raise ValueError(f"grid[{name!r}] lists the value {v!r} more than once")
            seen.add(c)
        names.append(name)
        values.append(normalized)
    return names, values


def sample_indices(grid_size, n_trials, seed):
    """``n_trials`` distinct indices into the grid's Cartesian product, drawn at random (all of them,
    in order, when ``n_trials >= grid_size``); the first k of a sample of n are the sample of k."""
    if n_trials >= grid_size:
        return range(grid_size)
    rng = random.Random(f"dselectk.sweep:{seed}")  # a str seed: deterministic, negative seeds distinct
    chosen, seen = [], set()
    while len(chosen) < n_trials:  # one at a time, so that the sample is a prefix of larger ones
        i = rng.randrange(grid_size)
        if i not in seen:
            seen.add(i)
            chosen.append(i)
    return chosen


def config_at(index, keys, values):
    """The configuration at ``index`` of the Cartesian product of ``values`` (the last key varies fastest)."""
    config = {}
    for name, options in zip(reversed(keys), reversed(values)):
        index, j = divmod(index, len(options))
        config[name] = options[j]
    return {name: config[name] for name in keys}


def plan_trial(config, repetition, sweep_seed):
    """One planned trial: its seed (SHA-256 of the sweep's seed, the config and the repetition, an
    int in [0, 2**31)) and its key in the results file (SHA-256 of config, repetition and seed)."""
    digest = hashlib.sha256(_canonical({"sweep_seed": sweep_seed, "config": config,
                                        "repetition": repetition}).encode()).digest()
    seed = int.from_bytes(digest[:8], "big") % 2**31
    key = hashlib.sha256(_canonical({"config": config, "repetition": repetition,
                                     "seed": seed}).encode()).hexdigest()[:24]
    return {"config": config, "repetition": repetition, "seed": seed, "key": key}
