"""A pytest plugin for mutation runs only (``-p tests.mutation.pytest_plugin``).

* Hypothesis fails a test whose example takes over 200 ms; under mutmut's call
  tracing, on a shared machine, a correct test can. Mutants are judged by what
  a test asserts, so deadlines are off; a mutant that hangs is still caught by
  the run's timeout.
* Under mutmut (``MUTANT_UNDER_TEST`` set), every call to a mutated function
  goes through its trampoline, whose allocations a test that measures memory
  with tracemalloc counts as the parser's. Such a test skips itself there the
  moment it starts tracemalloc; ``tests/mutation/run.py`` runs each survivor
  of mutmut again in a plain process, where those tests run.
* mutmut first runs the tests once to learn which functions each one calls
  (``MUTANT_UNDER_TEST=stats``). Verdicts of that pass are not used, so its
  failures are let through; the clean run that follows must pass as always.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Generator

import pytest
from hypothesis import settings

settings.register_profile("mutation", deadline=None)
settings.load_profile("mutation")

_start = tracemalloc.start


def _start_unless_under_mutmut(nframe: int = 1) -> None:
    if "MUTANT_UNDER_TEST" in os.environ:
        pytest.skip("measures memory: run without mutmut's trampolines (tests/mutation/run.py)")
    _start(nframe)


tracemalloc.start = _start_unless_under_mutmut


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report a failed test as passed in mutmut's stats pass only."""
    report = yield
    if os.environ.get("MUTANT_UNDER_TEST") == "stats" and report.failed:
        report.outcome = "passed"
    return report
