"""Shared pytest options. ``--paper`` runs the tests marked ``paper``: the full protocols of the
paper's experiments (hours of CPU time; they write their tables under benchmarks/results/)."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--paper", action="store_true", default=False,
                     help="run the full paper-protocol experiments (tests marked 'paper')")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--paper"):
        return
    skip = pytest.mark.skip(reason="full paper protocol: run with pytest --paper")
    for item in items:
        if "paper" in item.keywords:
            item.add_marker(skip)
