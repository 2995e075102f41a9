"""pytest options of the dselectk test suite.

``--paper``: run the tests marked ``@pytest.mark.paper``, the full-protocol experiments of the
paper (long; some need data that benchmarks/ scripts fetch). Without it they are skipped.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--paper", action="store_true", default=False,
                     help="run the full-protocol paper experiments (tests marked 'paper'; slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--paper"):
        return
    skip = pytest.mark.skip(reason="a full-protocol paper experiment: run with --paper")
    for item in items:
        if "paper" in item.keywords:
            item.add_marker(skip)
