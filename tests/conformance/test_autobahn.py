"""RFC 6455 conformance: Autobahn|Testsuite's fuzzing client against relayd's echo route.

``wstest -m fuzzingclient`` (Python 2.7, in ``.wstest-venv``, built by ``./dev test`` from
``requirements-py2.txt``) runs every case of groups 1-10 against ``ws://127.0.0.1:PORT/echo``
of a relayd started with :data:`ECHO_CONFIG`. wstest always exits 0, so the verdict is read
from the ``index.json`` it writes:

* every case's ``behavior`` is OK, NON-STRICT or INFORMATIONAL, and its ``behaviorClose``
  is OK or INFORMATIONAL;
* exactly the cases of groups 1-10 ran (:data:`EXPECTED_CASES`), so a case that silently
  did not run is caught;
* relayd then exits 0 on SIGTERM with ``server.stop`` last and no internal ``error`` event.

Groups 12 and 13 (permessage-deflate) are excluded while relayd does not negotiate it.

A failure prints one line per failing case (its behaviours, the close code relayd sent, the
case's description and wstest's verdict); the full HTML and JSON reports stay in the test's
``tmp_path``, under ``reports/``.

Timing (measured on a 2-core machine): the 301 cases take about 17 s, most of it in the
cases that wait out a 1 s timer (5.19, 5.20, 6.4.x) and group 9's large messages; building
``.wstest-venv`` takes about 30 s the first time and nothing after.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from ..e2e.harness import (
    REPO_ROOT,
    TOOLS,
    RelaydProcess,
    Tool,
    relayd_command,
    relayd_env,
    require_tool,
)

pytestmark = pytest.mark.e2e

WSTEST_VENV: Final = REPO_ROOT / ".wstest-venv"
WSTEST: Final = WSTEST_VENV / "bin" / "wstest"

#: The whole run took about 17 s here; the bound only turns a hang into a failure.
WSTEST_TIMEOUT_S: Final = 300.0

#: How many cases autobahntestsuite 25.10.1 has in each group we run (there is no group 8).
#: 301 in all.
EXPECTED_CASES: Final = {1: 16, 2: 11, 3: 7, 4: 10, 5: 20, 6: 145, 7: 37, 9: 54, 10: 1}
CASE_PATTERNS: Final = [f"{group}.*" for group in range(1, 11)]
#: permessage-deflate: relayd does not negotiate it yet.
EXCLUDED_PATTERNS: Final = ["12.*", "13.*"]

PASSING_BEHAVIOR: Final = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
PASSING_CLOSE: Final = frozenset({"OK", "INFORMATIONAL"})

AGENT: Final = "relayd"

ECHO_CONFIG: Final = """\
# Autobahn conformance run (tests/conformance/test_autobahn.py): the built-in defaults except
# for the keys below, each changed only as far as the suite needs.

[diagnostics]
# The fuzzing client needs an echo server: ws://HOST:PORT/echo.
echo = true

[limits]
# Cases 9.1.6 and 9.2.6 send one message of 16 MiB (16 * 2**20 bytes, text and binary); the
# default 64 KiB would close them with 1009. Exactly 16 MiB, so the largest case also checks
# that a message of max_message_bytes is accepted.
max_message_bytes = 16777216
# Groups 9.7 and 9.8 send 1,000 messages per case, each as soon as the previous echo is back
# (thousands per second); at the default 50/s with a burst of 100 they would get rate_limited
# errors instead of echoes and then a 1008 close. Far above what the suite can send, so the
# limiter never acts. outbox_messages keeps its default: the client reads every echo.
messages_per_second = 1000000.0
message_burst = 1000000
# Groups 9.3 and 9.4 send a 4 MiB message in fragments of down to 64 bytes: 65,536 frames at
# once, where the default frame pacing (2,000 at once, 1,000/s) would close with 1008.
frames_per_second = 1000000.0
frame_burst = 1000000

[admin]
# A free port rather than the fixed 9031: other relayd processes may be running.
port = 0
"""


def _locate_wstest() -> Path | None:
    return WSTEST if WSTEST.is_file() and os.access(WSTEST, os.X_OK) else None


TOOLS.setdefault(
    "wstest",
    Tool(
        "Autobahn|Testsuite's wstest in .wstest-venv/, a Python 2.7 virtualenv "
        "(needs python2.7: pyenv's 2.7.18, or python2.7 on PATH)",
        "./dev test",
        _locate_wstest,
    ),
)


# -- reading wstest's reports ------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """One case's line in ``index.json``."""

    case_id: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    report_file: str

    @property
    def passed(self) -> bool:
        """Whether both behaviours are among the accepted ones."""
        return self.behavior in PASSING_BEHAVIOR and self.behavior_close in PASSING_CLOSE

    @property
    def group(self) -> int:
        """The case's group: 6 for ``6.4.3``."""
        return int(self.case_id.split(".")[0])

    @property
    def sort_key(self) -> tuple[int, ...]:
        """``6.10.1`` after ``6.9.1``, not before."""
        return tuple(int(part) for part in self.case_id.split("."))


def parse_index(index: Any, agent: str) -> list[CaseResult]:
    """The cases ``index.json`` records for ``agent``, in case order.

    Raises:
        AssertionError: the file does not have the shape wstest writes.
    """
    assert isinstance(index, dict), f"index.json is not an object: {index!r:.200}"
    cases = index.get(agent)
    assert isinstance(cases, dict), f"index.json has no agent {agent!r}: {sorted(index)}"
    results = []
    for case_id, entry in cases.items():
        assert isinstance(entry, dict), f"case {case_id}: {entry!r}"
        code = entry.get("remoteCloseCode")
        results.append(
            CaseResult(
                case_id=str(case_id),
                behavior=str(entry["behavior"]),
                behavior_close=str(entry["behaviorClose"]),
                remote_close_code=code if isinstance(code, int) else None,
                report_file=str(entry["reportfile"]),
            )
        )
    return sorted(results, key=lambda r: r.sort_key)


def _plain(html: object, limit: int) -> str:
    """Text from wstest's HTML-flavoured reports as one line of at most ``limit`` chars."""
    text = " ".join(re.sub(r"<[^>]+>", "", str(html)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_failures(failures: list[CaseResult], total: int, report_dir: Path) -> str:
    """A compact table of failing cases, with each case's description and wstest's verdict."""
    lines = [
        f"{len(failures)} of {total} Autobahn cases failed: behavior must be one of "
        f"{sorted(PASSING_BEHAVIOR)} and behaviorClose one of {sorted(PASSING_CLOSE)}.",
        f"Full reports: {report_dir / 'index.html'}",
        "",
        f"{'case':<8} {'behavior':<13} {'close':<13} {'code':<5} description / result / close",
    ]
    for case in failures:
        try:
            detail: Any = json.loads((report_dir / case.report_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            detail = {"description": f"(no case report: {exc})"}
        if not isinstance(detail, dict):
            detail = {}
        code = "-" if case.remote_close_code is None else str(case.remote_close_code)
        lines.append(
            f"{case.case_id:<8} {case.behavior:<13} {case.behavior_close:<13} {code:<5} "
            f"{_plain(detail.get('description', ''), 100)}"
        )
        lines.append(f"{'':<42} result: {_plain(detail.get('result', ''), 140)}")
        lines.append(f"{'':<42} close:  {_plain(detail.get('resultClose', ''), 140)}")
    return "\n".join(lines)


# -- running relayd and wstest -----------------------------------------------------------


def start_relayd(config: Path) -> RelaydProcess:
    """Start relayd with ``config`` on a random loopback port, as ``running_relayd`` does.

    The caller waits for it (:meth:`RelaydProcess.wait_ready`) and stops it
    (:meth:`RelaydProcess.stop`) in a ``finally``.
    """
    argv = [
        *relayd_command(),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-format",
        "json",
        "--config",
        str(config),
    ]
    return RelaydProcess(argv, relayd_env())


def write_spec(path: Path, url: str, outdir: Path) -> None:
    """Write the fuzzingclient spec: groups 1-10 against ``url``, reports into ``outdir``."""
    spec = {
        "outdir": str(outdir),
        "servers": [{"agent": AGENT, "url": url}],
        "cases": CASE_PATTERNS,
        "exclude-cases": EXCLUDED_PATTERNS,
        "exclude-agent-cases": {},
    }
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")


def run_wstest(wstest: Path, spec: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``wstest -m fuzzingclient``; fail the test if it hangs past the bound."""
    # Python 2 must not see this Python 3 process's PYTHON* settings (PYTHONPATH above all).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    try:
        return subprocess.run(
            [str(wstest), "-m", "fuzzingclient", "-s", str(spec)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=WSTEST_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # subprocess hands over what was read as bytes, even with text=True.
        raw = exc.stdout or b""
        out = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        tail = "\n".join(out.splitlines()[-20:])
        pytest.fail(f"wstest did not finish within {WSTEST_TIMEOUT_S}s\n{tail}", pytrace=False)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- the test ----------------------------------------------------------------------------


def test_autobahn_fuzzingclient_groups_1_to_10(tmp_path: Path) -> None:
    """Every case of groups 1-10 passes against /echo; relayd then stops cleanly."""
    wstest = require_tool("wstest")
    config = tmp_path / "relayd.toml"
    config.write_text(ECHO_CONFIG, encoding="utf-8")
    spec = tmp_path / "fuzzingclient.json"
    reports = tmp_path / "reports"

    relayd = start_relayd(config)
    try:
        relayd.wait_ready()
        write_spec(spec, f"{relayd.url}/echo", reports)
        result = run_wstest(wstest, spec, tmp_path)
    finally:
        code = relayd.stop()

    assert result.returncode == 0, (
        f"wstest exited {result.returncode}\n--- stdout ---\n{_tail(result.stdout)}"
        f"\n--- stderr ---\n{_tail(result.stderr)}"
    )
    index_file = reports / "index.json"
    assert index_file.is_file(), (
        f"wstest wrote no {index_file}\n--- stdout ---\n{_tail(result.stdout)}"
        f"\n--- stderr ---\n{_tail(result.stderr)}\n{relayd.describe()}"
    )
    cases = parse_index(json.loads(index_file.read_text(encoding="utf-8")), AGENT)

    ran = dict(sorted(Counter(case.group for case in cases).items()))
    assert ran == EXPECTED_CASES, f"cases run per group {ran}, expected {EXPECTED_CASES}"

    failures = [case for case in cases if not case.passed]
    assert not failures, describe_failures(failures, len(cases), reports)

    relayd.assert_clean_stop(code)
    errors = [e for e in relayd.events if e.get("event") == "error"]
    assert not errors, f"relayd logged internal errors: {errors}\n{relayd.describe()}"
    opened = [e for e in relayd.events if e.get("event") == "connection.open"]
    assert len(opened) == len(cases), (
        f"{len(opened)} connections for {len(cases)} cases: each case is one connection"
    )
    assert all(e.get("dialect") == "echo" for e in opened), "a case missed the echo route"
