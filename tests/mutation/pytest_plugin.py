"""A pytest plugin for mutation runs only (``-p tests.mutation.pytest_plugin``).

Hypothesis fails a test whose example takes over 200 ms; under mutmut's call
tracing, on a shared machine, a correct test can, and a clean run that fails
stops the whole module's run. Mutants are judged by what a test asserts, so
deadlines are off; a mutant that hangs is still caught by the run's timeout.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("mutation", deadline=None)
settings.load_profile("mutation")
