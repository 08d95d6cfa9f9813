"""A pytest plugin for mutation runs only (``-p tests.mutation.pytest_plugin``).

* Hypothesis fails a test whose example takes over 200 ms; under mutmut's call
  tracing, on a shared machine, a correct test can. Mutants are judged by what
  a test asserts, so deadlines are off; a mutant that hangs is still caught by
  the run's timeout.
* mutmut first runs the tests once to learn which functions each one calls
  (``MUTANT_UNDER_TEST=stats``), recording every call as it goes. Tests that
  measure memory with tracemalloc count that bookkeeping too and can fail
  there, which would stop the run. Verdicts of that pass are not used, so
  failures in it are let through; the clean run that follows must pass as
  always, and every mutant is judged without the recording.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest
from hypothesis import settings

settings.register_profile("mutation", deadline=None)
settings.load_profile("mutation")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report a failed test as passed in mutmut's stats pass only."""
    report = yield
    if os.environ.get("MUTANT_UNDER_TEST") == "stats" and report.failed:
        report.outcome = "passed"
    return report
