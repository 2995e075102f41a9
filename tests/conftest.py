"""Shared pytest configuration: the ``--paper`` option.

Tests marked ``@pytest.mark.paper`` (the marker is registered in pyproject.toml) run the full
protocol of an experiment of the paper and take hours; they are skipped unless pytest is given
``--paper`` (``pytest --paper -m paper`` runs only them).
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--paper", action="store_true", default=False,
                     help="also run the full-protocol experiments of the paper (tests marked 'paper'; hours)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--paper"):
        return
    skip = pytest.mark.skip(reason="full-protocol experiment of the paper: run with --paper")
    for item in items:
        if "paper" in item.keywords:
            item.add_marker(skip)
