"""Mutation testing of relayd's I/O-free core: ``./dev mutation [MODULE ...]`` (docs/testing.md).

* :mod:`tests.mutation.plan`: which modules are tested against which test file,
  and the equivalent mutants excluded from the score (``equivalents.toml``).
* :mod:`tests.mutation.skipped`: the mutants mutmut never makes (module and class
  constants, decorated functions), made by a small AST pass of our own.
* :mod:`tests.mutation.run`: the command itself; it runs in ``.mutation-venv``,
  which ``./dev mutation`` builds with mutmut.

Nothing here is collected by pytest; ``tests/test_mutation.py`` keeps it true.
"""
