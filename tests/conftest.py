import os
import sys

# Tests import the project's top-level packages (datasets, engine, ...) from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _logging_handlers_of_this_test_only():
    """``train.main`` (``engine.logging.setup_logging``) binds root handlers to the ``sys.stdout``
    of the test that called it, which pytest closes afterwards; a later test's log record would
    hit that closed stream and print a logging traceback into its stderr. Drop them after each test
    (pytest's own capture handlers are subclasses and stay)."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
