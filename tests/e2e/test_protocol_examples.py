"""The client programs of docs/protocol.md ("Examples"), run as written against a relayd.

Each is taken from the page, its ``ws://localhost:9030`` made the test relayd's URL,
and run as a child process; what it prints is compared with what the page says it
prints. They run until killed (they wait for more messages): each is killed, by its
own handle, once its lines are in.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
import trio

from .harness import NODE_MODULES, REPO_ROOT, RelaydProcess, require_tool

pytestmark = pytest.mark.e2e

PAGE: Final = REPO_ROOT / "docs" / "protocol.md"
#: Bound on waiting for a program's lines; it answers on loopback in milliseconds.
WAIT_S: Final = 20.0
ID: Final = r"[A-Za-z0-9_-]{22}"


def program(heading: str, language: str) -> str:
    """The first ``language`` block under ``### heading`` on the page."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split(f"\n### {heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("\n```", 1)[0] + "\n"


def output_after(heading: str) -> list[str]:
    """The lines of the plain block that follows the program under ``### heading``."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split(f"\n### {heading}\n", 1)[1]
    return section.split("\n```\n", 3)[2].splitlines()


async def first_lines(argv: list[str], count: int, env: dict[str, str]) -> list[str]:
    """The first ``count`` lines ``argv`` prints, stdout and stderr; then it is killed."""
    async with trio.open_nursery() as nursery:
        run = functools.partial(
            trio.run_process,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # the Node example's errors go to stderr
            env=env,
            check=False,
        )
        proc: trio.Process = await nursery.start(run)
        assert proc.stdout is not None
        buffer = b""
        try:
            with trio.fail_after(WAIT_S):
                while buffer.count(b"\n") < count:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, f"{argv} ended after {buffer!r}"
                    buffer += chunk
        finally:
            proc.kill()
    return buffer.decode().splitlines()[:count]


def with_url(source: str, relayd: RelaydProcess) -> str:
    assert "ws://localhost:9030" in source
    return source.replace("ws://localhost:9030", relayd.url)


async def test_the_node_ws_example_talks_to_itself_and_names_an_unknown_recipient(
    relayd_process: RelaydProcess, tmp_path: Path
) -> None:
    node = require_tool("node")
    require_tool("ws")
    script = tmp_path / "client.js"
    script.write_text(with_url(program("Node (`ws`), relayd.v1 with acks", "js"), relayd_process))
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}  # the page's `npm install ws`
    alone = await first_lines([str(node), str(script)], 2, env)
    assert re.fullmatch(f"my id: ({ID})", alone[0]), alone
    me = alone[0].removeprefix("my id: ")
    assert alone[1] == f"from {me} {{ text: 'hi' }}"
    nobody = await first_lines([str(node), str(script), "nobody"], 2, env)
    assert nobody[1] == (
        "not delivered: unknown_recipient no client with that id is connected { text: 'hi' }"
    )


async def test_the_python_websockets_example_prints_what_the_page_shows(
    relayd_process: RelaydProcess, tmp_path: Path
) -> None:
    heading = "Python (`websockets`), relayd.v1 with acks"
    script = tmp_path / "client.py"
    script.write_text(with_url(program(heading, "python"), relayd_process))
    shown = output_after(heading)
    env = dict(os.environ)
    alone = await first_lines([sys.executable, str(script)], 2, env)
    nobody = await first_lines([sys.executable, str(script), "nobody"], 1, env)
    assert re.fullmatch(f"from {ID} {{'text': 'hi'}}", alone[0]), alone
    # The page's lines, its id being another run's.
    assert [re.sub(ID, "ID", line) for line in alone + nobody] == [
        re.sub(ID, "ID", line) for line in shown
    ]
