"""``relayd chat`` as a person or a script uses it: the real command against a real relayd.

Each test runs relayd in-process on a loopback port and ``python -m relayd chat`` as a
child process with piped stdin, stdout and stderr. Nothing sleeps: every wait reads the
child's output until the expected line, under a trio-clock deadline, so a hung child
fails the test; children still running at the end are killed, by their own handle.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import struct
import subprocess
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import structlog
import trio
import trustme
from pydantic import SecretStr

from relayd.client.chat import TOKEN_VARIABLE
from relayd.config import AuthSettings, TLSSettings
from relayd.daemon.credentials import load_authenticator, load_tls
from relayd.daemon.server import Server
from relayd.wire.frames import OP_TEXT, FrameParser
from relayd.wire.server_frames import close_frame
from tests.client import connect, running, settings
from tests.test_api import call
from tests.test_cli import MODULE, SCRIPT, clean_env
from tests.test_client import accept_v1, serve_tcp

#: Bound on one wait for a line or an exit; relayd answers on loopback in milliseconds,
#: so this only catches a hang (a child's start-up, imports included, is within it).
WAIT_S: Final = 15.0
UNKNOWN: Final = "unknown_recipient: no client with that id is connected"
#: alice's token: relayd refuses static tokens under 16 characters.
ALICE: Final = "alice-token-0123456789"
#: What the chat says, once, when relayd first refuses a message as over its rate limit.
SLOWED: Final = (
    "relayd chat: over the server's rate limit: a message it refuses is sent again after the"
    " wait it asks for"
)
CONNECTED: Final = re.compile(r"connected to (?P<url>\S+) as (?P<id>\S+) \((?P<dialect>[^)]+)\)")


class Chat:
    """One ``relayd chat`` child process."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.id = ""
        self._out = bytearray()
        self._err = bytearray()

    async def _line(self, stream: trio.abc.ReceiveStream | None, buffer: bytearray) -> str | None:
        assert stream is not None
        with trio.fail_after(WAIT_S):
            while (end := buffer.find(b"\n")) < 0:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    if buffer:
                        raise AssertionError(f"a last line without a line break: {buffer!r}")
                    return None
                buffer += chunk
        line = buffer[:end].decode()
        del buffer[: end + 1]
        return line

    async def line(self) -> str:
        """The next stdout line; the process must still be writing."""
        line = await self._line(self.proc.stdout, self._out)
        assert line is not None, f"stdout ended; stderr: {await self.rest_of_stderr()}"
        return line

    async def expect(self, *lines: str) -> None:
        """The next stdout lines are exactly ``lines``."""
        for expected in lines:
            assert await self.line() == expected

    async def stderr_line(self) -> str:
        line = await self._line(self.proc.stderr, self._err)
        assert line is not None, "stderr ended"
        return line

    async def rest_of_stderr(self) -> str:
        lines = []
        while (line := await self._line(self.proc.stderr, self._err)) is not None:
            lines.append(line)
        return "".join(f"{line}\n" for line in lines)

    async def send(self, text: str, end: str = "\n") -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(f"{text}{end}".encode())

    async def end_input(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()

    async def finish(self) -> tuple[int, list[str], str]:
        """Wait for the exit: the status, the stdout lines not read yet, and the stderr."""
        rest = []
        while (line := await self._line(self.proc.stdout, self._out)) is not None:
            rest.append(line)
        stderr = await self.rest_of_stderr()
        with trio.fail_after(WAIT_S):
            status = await self.proc.wait()
        return status, rest, stderr


def _environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without relayd's settings or a token, plus ``extra``."""
    env = clean_env()
    env.pop(TOKEN_VARIABLE, None)
    return env | extra


@asynccontextmanager
async def started(
    url: str, *args: str, command: list[str] = MODULE, env: dict[str, str] | None = None
) -> AsyncIterator[Chat]:
    """``relayd chat URL ARGS``, not yet connected; killed on exit if still running."""
    proc = await trio.lowlevel.open_process(
        [*command, "chat", url, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_environment(env or {}),
    )
    try:
        yield Chat(proc)
    finally:
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                proc.kill()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    await pipe.aclose()
            await proc.wait()


@asynccontextmanager
async def chatting(
    url: str, *args: str, command: list[str] = MODULE, env: dict[str, str] | None = None
) -> AsyncIterator[Chat]:
    """``relayd chat``, once it has printed its first line: connected, in the dialect asked."""
    async with started(url, *args, command=command, env=env) as chat:
        first = await chat.line()
        match = CONNECTED.fullmatch(first)
        assert match is not None, (first, await chat.rest_of_stderr())
        assert match["url"] == url
        assert match["dialect"] == ("seed" if "--seed" in args else "relayd.v1")
        chat.id = match["id"]
        yield chat


async def run_to_exit(
    url: str, *args: str, env: dict[str, str] | None = None
) -> tuple[int, list[str], str]:
    """A chat that is expected to exit by itself, stdin left open."""
    async with started(url, *args, env=env) as chat:
        return await chat.finish()


# -- the issue's walk-through: two people, one per dialect ---------------------------


@pytest.mark.parametrize("command", [MODULE, SCRIPT], ids=["python-m", "script"])
async def test_a_seed_and_a_v1_client_talk_both_ways(command: list[str]) -> None:
    async with (
        running(Server(settings())) as url,
        chatting(url, "--seed", command=command) as seed,
        chatting(url, command=command) as v1,
    ):
        assert len(seed.id) == len(v1.id) == 22
        assert seed.id != v1.id

        await seed.send(f"{v1.id} hello from seed")
        await v1.expect(f"< {seed.id}: hello from seed")
        await seed.send(f'{v1.id} {{"n": [1, 2]}}')
        await v1.expect(f'< {seed.id}: {{"n": [1, 2]}}')

        await v1.send(f"{seed.id} hi from v1")
        await v1.expect("ack 1")
        await seed.expect("< hi from v1")
        await v1.send(f"{seed.id} [true, null]")
        await v1.expect("ack 2")
        await seed.expect("< [true, null]")

        await seed.send("/quit")
        await v1.send("/quit")
        assert await seed.finish() == (0, ["closed: 1000"], "")
        assert await v1.finish() == (0, ["closed: 1000"], "")


# -- input: what a typed line sends ----------------------------------------------------


async def test_typed_json_is_sent_as_json_as_typed_anything_else_as_a_string() -> None:
    cases = [
        ("hello there", '"hello there"'),
        ('{"n": 1,  "s": "x"}', '{"n": 1,  "s": "x"}'),  # exactly as typed
        ("[1, 2]", "[1, 2]"),
        ("42", "42"),
        ('"42"', '"42"'),
        ("true", "true"),
        ("null", "null"),
        ("-1.5e3", "-1.5e3"),
        ("1 2", '"1 2"'),
        ("{not json", '"{not json"'),
        ("NaN", '"NaN"'),
        ('  "padded"  \t', '"padded"'),
        ("a\ttab", '"a\\ttab"'),
        ("héllo ☃", '"héllo ☃"'),
    ]
    async with (
        running(Server(settings())) as url,
        connect(url, v1=True) as peer,
        chatting(url) as chat,
    ):
        for ref, (typed, sent) in enumerate(cases, start=1):
            await chat.send(f"{peer.id}   {typed}")
            frame = await peer.recv()
            assert frame == f'{{"type":"message","from":"{chat.id}","message":{sent}}}', typed
            await chat.expect(f"ack {ref}")


# -- output: what arrives --------------------------------------------------------------


async def test_each_arrival_is_one_line_and_control_characters_are_escaped() -> None:
    async with (
        running(Server(settings())) as url,
        connect(url, v1=True) as peer,
        chatting(url) as v1,
        chatting(url, "--seed") as seed,
    ):
        for chat in (v1, seed):
            prefix = f"< {peer.id}: " if chat is v1 else "< "
            await peer.send(chat.id, "two\nlines, \x1b[31mred\x1b[0m \x9b, ☃")
            await chat.expect(prefix + "two\\nlines, \\x1b[31mred\\x1b[0m \\x9b, ☃")
            await peer.ws.send_message(f'{{"to": "{chat.id}", "message": {{"k":\n [1,  2]}}}}')
            await chat.expect(prefix + '{"k":\\n [1,  2]}')
            await peer.send(chat.id, 42)
            await chat.expect(prefix + "42")


async def test_a_message_from_the_server_api_shows_as_from_the_server() -> None:
    server = Server(settings())
    async with running(server) as url, chatting(url) as v1, chatting(url, "--seed") as seed:
        admin = server.admin_address
        assert admin is not None
        await call(admin, "/api/publish", {"to": v1.id, "message": {"kind": "notice"}})
        await v1.expect('< (server): {"kind": "notice"}')
        await call(admin, "/api/publish", {"to": seed.id, "message": "deploy at 18:00"})
        await seed.expect("< deploy at 18:00")  # the seed dialect does not say who


async def test_an_unknown_id_is_an_error_line_matched_to_its_ref_in_v1() -> None:
    async with (
        running(Server(settings())) as url,
        chatting(url) as v1,
        chatting(url, "--seed") as seed,
    ):
        await v1.send("nobody hello")
        await v1.expect(f"! {UNKNOWN} (message 1 to nobody)")
        await v1.send(f"{v1.id} to myself")  # delivered first, then acked
        await v1.expect(f"< {v1.id}: to myself", "ack 2")
        await v1.send("nobody again")
        await v1.expect(f"! {UNKNOWN} (message 3 to nobody)")

        await seed.send("nobody hello")
        await seed.expect(f"! {UNKNOWN}")
        await seed.send(f"{seed.id} to myself")
        await seed.expect("< to myself")


# -- commands ----------------------------------------------------------------------------


async def test_commands_blank_lines_and_mistakes() -> None:
    async with running(Server(settings())) as url, chatting(url, "--seed") as chat:
        await chat.send("")
        await chat.send("   \t")
        await chat.send("/id")
        await chat.expect(f"id: {chat.id}")
        await chat.send("/help")
        help_lines = [await chat.line() for _ in range(3)]
        assert help_lines[0] == "Type a line to send a message:"
        assert help_lines[1].startswith("  ID MESSAGE ")
        await chat.send("/nope")
        assert await chat.stderr_line() == "relayd chat: unknown command /nope; /help lists them"
        await chat.send(chat.id)
        assert await chat.stderr_line() == (
            "relayd chat: nothing to send: type ID MESSAGE, or /to ID first (/help)"
        )
        await chat.send(f"{chat.id} still here\r")
        while (line := await chat.line()) != "< still here":
            assert not line.startswith("<"), line  # the rest of the help
        await chat.send("/quit and some words")
        status, rest, stderr = await chat.finish()
    assert (status, rest, stderr) == (0, ["closed: 1000"], "")


@pytest.mark.parametrize("ending", ["/quit", "end of input", "Ctrl-C", "SIGTERM"])
async def test_quit_end_of_input_and_ctrl_c_close_with_1000_and_exit_0(ending: str) -> None:
    with structlog.testing.capture_logs() as events:
        async with (
            running(Server(settings())) as url,
            connect(url) as peer,
            chatting(url) as chat,
        ):
            await chat.send("/id")  # the session is reading input
            await chat.expect(f"id: {chat.id}")
            if ending == "/quit":
                await chat.send("/quit")
            elif ending == "end of input":
                await chat.send(f"{peer.id} last words", end="")  # no line break
                await chat.end_input()
                assert await peer.recv() == "last words"
            elif ending == "Ctrl-C":
                chat.proc.send_signal(signal.SIGINT)
            else:  # `kill`, `timeout`: it killed the chat, relayd saw 1006
                chat.proc.send_signal(signal.SIGTERM)
            status, rest, stderr = await chat.finish()
    assert (status, stderr) == (0, "")
    assert rest == (["ack 1", "closed: 1000"] if ending == "end of input" else ["closed: 1000"])
    closes = [e for e in events if e["event"] == "connection.close" and e["id"] == chat.id]
    assert [(e["code"], e["closed_by"]) for e in closes] == [(1000, "client")]


# -- closes by the server ----------------------------------------------------------------


async def test_a_server_shutdown_prints_1001_and_exits_0() -> None:
    server = Server(settings())
    async with running(server) as url, chatting(url, "--seed") as chat:
        server.shutdown("test")
        assert await chat.finish() == (0, ["closed: 1001 server shutting down"], "")


async def test_a_message_whose_outcome_the_close_cut_off_gets_a_line_of_its_own() -> None:
    # Every other message has an ack or error line; this one had none at all.
    async def reads_one_then_shuts_down(stream: trio.SocketStream) -> None:
        async with stream:
            await accept_v1(stream, "the-id")
            parser = FrameParser(65536)
            frames: list[tuple[int, bytes]] = []
            while not any(op == OP_TEXT for op, _ in frames):
                frames += parser.feed(await stream.receive_some(4096))
            await stream.send_all(close_frame(1001, "server shutting down"))
            while await stream.receive_some(4096):  # the chat's close frame, then its FIN
                pass

    async with trio.open_nursery() as nursery:
        url = await serve_tcp(nursery, reads_one_then_shuts_down)
        async with chatting(url) as chat:
            await chat.send("someone hello")
            status, rest, stderr = await chat.finish()
        nursery.cancel_scope.cancel()
    assert (status, rest) == (0, ["closed: 1001 server shutting down"])
    assert stderr == (
        "relayd chat: message 1 to someone: the connection closed before its outcome was"
        " known; it may or may not have been delivered\n"
    )


async def test_any_other_close_exits_1() -> None:
    server = Server(settings())
    async with running(server) as url, chatting(url) as chat:
        admin = server.admin_address
        assert admin is not None
        await call(admin, "/api/disconnect", {"id": chat.id})  # 1008, by default
        status, rest, stderr = await chat.finish()
    assert (status, rest, stderr) == (1, ["closed: 1008 disconnected by the server"], "")


async def test_lines_over_the_rate_limit_are_sent_again_not_lost_to_a_1008() -> None:
    # A pasted or piped burst of lines: relayd refuses the messages over its rate, and
    # closes a client that goes on sending over it with 1008. Each refused one was
    # shown as an error line, and lost, until the close cut the rest off.
    async with (
        running(Server(settings(messages_per_second=10.0, message_burst=3))) as url,
        connect(url) as peer,
        chatting(url) as chat,
    ):
        lines = [f"line {n}" for n in range(8)]
        await chat.send("".join(f"{peer.id} {line}\n" for line in lines), end="")
        await chat.expect(*(f"ack {n}" for n in range(1, len(lines) + 1)))
        assert [await peer.recv() for _ in lines] == lines  # each once, in order
        await chat.end_input()
        status, rest, stderr = await chat.finish()
    assert (status, rest, stderr) == (0, ["closed: 1000"], f"{SLOWED}\n")


async def test_a_line_still_held_back_by_the_rate_limit_at_the_end_is_named_not_sent() -> None:
    async with (
        running(Server(settings(messages_per_second=1e-6, message_burst=1))) as url,
        connect(url) as peer,
        chatting(url) as chat,
    ):
        await chat.send(f"{peer.id} sent")
        await chat.expect("ack 1")
        await chat.send(f"{peer.id} held back")
        # Refused: it waits for the token relayd says its rate refills, 1e6 s (a hundredth
        # more for the clocks), which the Ctrl-C below comes well within however slow the
        # machine (it waited 1 s).
        assert await chat.stderr_line() == (
            "relayd chat: over the server's rate limit: a message it refuses is sent again"
            " after the wait it asks for (1.01e+06 s)"
        )
        chat.proc.send_signal(signal.SIGINT)
        status, rest, stderr = await chat.finish()
        assert await peer.recv() == "sent"
    assert (status, rest) == (0, ["closed: 1000"])
    assert stderr == (
        f"relayd chat: message 2 to {peer.id}: not sent (refused as over the server's rate"
        " limit, and not sent again before the end)\n"
    )


async def test_a_line_over_the_servers_limit_is_refused_here_and_the_chat_goes_on() -> None:
    async with (
        running(Server(settings(max_message_bytes=100))) as url,
        chatting(url) as chat,
    ):
        await chat.send(f"{chat.id} {'x' * 200}")
        assert await chat.stderr_line() == (
            "relayd chat: not sent: the message is 252 bytes with its envelope, over the"
            " server's limit of 100 bytes"
        )
        await chat.send(f"{chat.id} short")
        await chat.expect(f"< {chat.id}: short", "ack 1")
        await chat.send("/quit")
        assert await chat.finish() == (0, ["closed: 1000"], "")


async def test_to_sets_a_default_recipient_for_whole_lines() -> None:
    async with (
        running(Server(settings())) as url,
        connect(url, v1=True) as peer,
        chatting(url) as chat,
    ):
        await chat.send(f"/to {peer.id}")
        await chat.send("hello there, all of this line")
        assert await peer.recv_json() == {
            "type": "message",
            "from": chat.id,
            "message": "hello there, all of this line",
        }
        await chat.expect("ack 1")
        await chat.send('{"n": 1}')
        assert (await peer.recv_json())["message"] == {"n": 1}
        await chat.expect("ack 2")
        await chat.send("/to")  # back to ID MESSAGE
        await chat.send(f"{peer.id} addressed again")
        assert (await peer.recv_json())["message"] == "addressed again"
        await chat.expect("ack 3")
        # Two words are no id: refused, and the recipient stays as it was (none).
        await chat.send(f"/to {peer.id} hello")
        assert await chat.stderr_line() == (
            "relayd chat: /to takes one ID (/to alone goes back to ID MESSAGE)"
        )
        await chat.send(f"{peer.id} still addressed")
        assert (await peer.recv_json())["message"] == "still addressed"
        await chat.expect("ack 4")


# -- connection failures: one line on stderr, exit 1 ------------------------------------


async def test_a_server_at_capacity_is_a_503_on_stderr() -> None:
    async with (
        running(Server(settings(max_connections=1))) as url,
        connect(url),  # the one connection allowed
    ):
        status, out, err = await run_to_exit(url)
    assert (status, out) == (1, [])
    assert err == f"relayd chat: {url} refused the handshake: HTTP 503 server at capacity\n"


def _with_tokens() -> Server:
    auth = AuthSettings(mode="token", tokens={"alice": SecretStr(ALICE)})
    return Server(
        settings().model_copy(update={"auth": auth}), authenticator=load_authenticator(auth)
    )


@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_a_missing_or_bad_token_is_a_401_on_stderr(token: str | None) -> None:
    async with running(_with_tokens()) as url:
        env = {} if token is None else {TOKEN_VARIABLE: token}
        status, out, err = await run_to_exit(url, env=env)
    assert (status, out) == (1, [])
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"relayd chat: {url} refused the handshake: HTTP 401 "), err
    assert len(lines[0]) > len(f"relayd chat: {url} refused the handshake: HTTP 401 "), "no body"
    assert "wrong-token" not in err
    # Only a chat that sent no token is told where one goes.
    hint = f" (the server wants a token: set {TOKEN_VARIABLE} or use --token-file PATH)"
    assert lines[0].endswith(hint) == (token is None), err


async def test_relayd_token_is_not_read_and_says_so() -> None:
    async with running(_with_tokens()) as url:
        status, out, err = await run_to_exit(url, env={"RELAYD_TOKEN": ALICE})
    assert (status, out) == (1, [])
    first, refused = err.splitlines()
    assert first == f"relayd chat: RELAYD_TOKEN is not read: the token comes from {TOKEN_VARIABLE}"
    assert "HTTP 401" in refused
    assert ALICE not in err


async def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{ALICE}\n", encoding="utf-8")
    async with running(_with_tokens()) as url:
        async with chatting(url, env={TOKEN_VARIABLE: ALICE}) as chat:
            assert chat.id == "alice"
            await chat.send("alice hi me")
            await chat.expect("< alice: hi me", "ack 1")
        async with chatting(url, "--token-file", str(token_file)) as chat:
            assert chat.id == "alice"


async def test_a_token_on_the_command_line_is_refused_with_the_reason() -> None:
    status, out, err = await run_to_exit("ws://127.0.0.1:9/", "--token", ALICE)
    assert (status, out) == (2, [])
    assert err.endswith(
        f"relayd chat: error: --token is not accepted: `ps` shows it to every user; set"
        f" {TOKEN_VARIABLE} or use --token-file PATH\n"
    )
    assert ALICE not in err


async def test_a_token_in_the_url_is_refused_like_token_without_showing_it() -> None:
    async with running(_with_tokens()) as url:
        status, out, err = await run_to_exit(f"{url}?x=1&token={ALICE}")
    assert (status, out) == (2, [])
    assert err == (
        "relayd chat: ?token= in the URL is not accepted: `ps` shows it to every user;"
        f" set {TOKEN_VARIABLE} or use --token-file PATH\n"
    )


async def test_nothing_listening_is_one_line_on_stderr() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{bound.getsockname()[1]}/"
        status, out, err = await run_to_exit(url)
    assert (status, out) == (1, [])
    assert err.startswith(f"relayd chat: cannot connect to {url}: "), err
    assert "Connection refused" in err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://127.0.0.1:9030/"], "bad URL 'http://127.0.0.1:9030/': the URL must start with"),
        (["ws:///path"], "bad URL 'ws:///path': the URL has no host"),
        (["ws://127.0.0.1:99999/"], "bad URL 'ws://127.0.0.1:99999/': the URL's port must be"),
        (["ws://u:secret@127.0.0.1/"], "bad URL 'ws://***@127.0.0.1/': no user or password"),
        # A password with a / or an @, or no scheme: none of it is shown, nor quoted by
        # urllib as a port (found by a reviewer).
        (["ws://u:pa/ss@127.0.0.1/"], "bad URL 'ws://***@127.0.0.1/': the URL's port must"),
        (["ws://u:p@ss@127.0.0.1/"], "bad URL 'ws://***@127.0.0.1/': no user or password"),
        (["u:secret@127.0.0.1:9"], "bad URL '***@127.0.0.1:9': the URL must start with"),
        (["ws://127.0.0.1/a b"], "bad URL 'ws://127.0.0.1/a b': the URL must be printable ASCII"),
        (["ws://127.0.0.1/", "--token-file", "/nonexistent/token"], "bad token: cannot read"),
    ],
)
async def test_a_bad_url_or_token_exits_2(args: list[str], message: str) -> None:
    status, out, err = await run_to_exit(*args)
    assert (status, out) == (2, [])
    assert err.startswith(f"relayd chat: {message}"), err
    assert err.count("\n") == 1, err


async def test_input_that_is_not_utf8_is_sent_with_u_fffd_and_the_user_is_told() -> None:
    # It was replaced without a word (found by a tester).
    async with running(Server(settings())) as url, chatting(url) as chat:
        assert chat.proc.stdin is not None
        await chat.proc.stdin.send_all(f"{chat.id} caf".encode() + b"\xe9!\n")
        assert await chat.stderr_line() == (
            "relayd chat: a line was not UTF-8: its bad bytes are sent as U+FFFD"
        )
        await chat.expect(f"< {chat.id}: caf\ufffd!", "ack 1")


async def test_a_closed_stdin_is_no_input_and_the_chat_ends_as_at_its_end() -> None:
    async with running(Server(settings())) as url:
        proc = await trio.run_process(
            [*MODULE, "chat", url],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_environment({}),
            # The caller's `<&-`: the chat starts without a descriptor 0.
            preexec_fn=lambda: os.close(0),
        )
    assert proc.returncode == 0, proc.stderr
    assert CONNECTED.fullmatch(proc.stdout.decode().splitlines()[0])
    assert proc.stderr == b""


async def test_a_non_blocking_stdin_with_nothing_yet_is_waited_on_not_taken_as_its_end() -> None:
    # O_NONBLOCK on stdin (set by another program sharing the pipe or terminal): the first
    # read found nothing, "cannot read stdin: [Errno 11]", and the chat ended at once.
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        async with running(Server(settings())) as url, connect(url, v1=True) as peer:
            proc = await trio.lowlevel.open_process(
                [*MODULE, "chat", url],
                stdin=read_end,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_environment({}),
            )
            os.close(read_end)
            read_end = -1
            chat = Chat(proc)
            try:
                match = CONNECTED.fullmatch(await chat.line())
                assert match is not None
                await peer.send(match["id"], "are you there?")  # the session is running
                await chat.expect(f"< {peer.id}: are you there?")
                os.write(write_end, f"{peer.id} yes\n".encode())
                with trio.fail_after(WAIT_S):
                    assert (await peer.recv_json())["message"] == "yes"
                await chat.expect("ack 1")
                os.close(write_end)
                write_end = -1
                assert await chat.finish() == (0, ["closed: 1000"], "")
            finally:
                with trio.CancelScope(shield=True):
                    if proc.poll() is None:
                        proc.kill()
                    for pipe in (proc.stdout, proc.stderr):
                        if pipe is not None:
                            await pipe.aclose()
                    await proc.wait()
    finally:
        for end in (read_end, write_end):
            if end >= 0:
                os.close(end)


async def test_a_token_that_cannot_be_a_header_exits_2_without_showing_it() -> None:
    status, out, err = await run_to_exit("ws://127.0.0.1/", env={TOKEN_VARIABLE: "two words"})
    assert (status, out) == (2, [])
    assert err == "relayd chat: bad token: the token must be printable ASCII without spaces\n"


# -- TLS -------------------------------------------------------------------------------


async def test_wss_verifies_against_the_system_trust_store_or_a_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = TLSSettings(cert_file=str(tmp_path / "both.pem"), key_file=str(tmp_path / "key.pem"))
    async with running(Server(settings(), tls=load_tls(tls)), scheme="wss") as url:
        # SSL_CERT_FILE replaces OpenSSL's default trust store, as an operator's CA would.
        async with chatting(url, env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")}) as chat:
            await chat.send(f"{chat.id} over TLS")
            await chat.expect(f"< {chat.id}: over TLS", "ack 1")
        status, out, err = await run_to_exit(
            url, env={"SSL_CERT_FILE": str(tmp_path / "empty.pem")}
        )
        # A private CA without touching the process's trust store: --ca-file.
        async with chatting(url, "--ca-file", str(tmp_path / "ca.pem")) as chat:
            await chat.send(f"{chat.id} trusted")
            await chat.expect(f"< {chat.id}: trusted", "ack 1")
    assert (status, out) == (1, [])
    assert err.startswith(f"relayd chat: TLS handshake with {url} failed: "), err
    assert "CERTIFICATE_VERIFY_FAILED" in err
    assert err.endswith(" (for a private CA: --ca-file PATH)\n"), err


async def test_the_ca_file_hint_is_only_for_a_certificate_whose_issuer_is_not_trusted(
    tmp_path: Path,
) -> None:
    # A name mismatch with the right --ca-file was hinted "for a private CA: --ca-file PATH".
    ca = trustme.CA()
    cert = ca.issue_cert("relayd.example")  # not 127.0.0.1, the URL's host
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.pem"))
    tls = TLSSettings(cert_file=str(tmp_path / "both.pem"), key_file=str(tmp_path / "key.pem"))
    async with running(Server(settings(), tls=load_tls(tls)), scheme="wss") as url:
        mismatch = await run_to_exit(url, "--ca-file", str(tmp_path / "ca.pem"))
        wrong_ca = await run_to_exit(url, "--ca-file", str(tmp_path / "other.pem"))
    status, out, err = mismatch
    assert (status, out) == (1, [])
    assert "IP address mismatch" in err, err
    assert "CA" not in err.rpartition("mismatch")[2], err  # no hint: a CA file would not help
    status, out, err = wrong_ca
    assert (status, out) == (1, [])
    assert err.endswith(" (is it the right CA file?)\n"), err


async def test_a_ca_file_that_cannot_be_used_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_text("")
    for args, message in [
        (["wss://127.0.0.1/", "--ca-file", str(tmp_path / "none.pem")], "bad --ca-file: cannot"),
        (["wss://127.0.0.1/", "--ca-file", str(tmp_path / "empty.pem")], "bad --ca-file: cannot"),
        (["ws://127.0.0.1/", "--ca-file", str(tmp_path / "empty.pem")], "--ca-file is for a wss"),
    ]:
        status, out, err = await run_to_exit(*args)
        assert (status, out) == (2, [])
        assert err.startswith(f"relayd chat: {message}"), err
        assert err.count("\n") == 1, err


async def test_wss_to_a_plain_server_says_it_may_speak_ws() -> None:
    async with running(Server(settings())) as url:
        tls_url = url.replace("ws://", "wss://")
        status, out, err = await run_to_exit(tls_url)
    assert (status, out) == (1, [])
    assert err.startswith(f"relayd chat: TLS handshake with {tls_url} failed: "), err
    assert err.endswith(f"(the server answered in plain text: it may speak {url}, not wss://)\n")


# -- no daemon configuration -------------------------------------------------------------


async def test_chat_reads_no_daemon_configuration() -> None:
    # Each of these makes `relayd serve` and `relayd check-config` exit 78 (tests/test_cli.py).
    bad = {"RELAYD_LIMITS__MAX_CONNECTIONS": "lots", "PORT": "-1"}
    async with running(Server(settings())) as url, chatting(url, "--seed", env=bad) as chat:
        await chat.send("/quit")
        assert await chat.finish() == (0, ["closed: 1000"], "")


# -- at a terminal: a prompt, line editing, history, Ctrl-C ---------------------------------

#: CSI sequences (cursor moves, clears, bracketed paste), carriage returns and backspaces:
#: what readline draws with, taken out to compare the text a person sees.
_DRAWING: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\x08")


class Terminal:
    """``relayd chat`` on a pseudo-terminal whose controlling terminal it is."""

    def __init__(self, proc: trio.Process, master: trio.lowlevel.FdStream) -> None:
        self.proc = proc
        self.master = master
        self.raw = ""  # everything the program drew, escape sequences and all
        self._seen = 0  # how much of the screen expect() has gone past

    @property
    def screen(self) -> str:
        """What it drew, as text: one entry per line, drawing sequences removed."""
        return _DRAWING.sub("", self.raw)

    async def expect(self, text: str) -> None:
        """Read until ``text`` has been drawn after what the last expect found."""
        with trio.fail_after(WAIT_S):
            while (found := self.screen.find(text, self._seen)) < 0:
                try:
                    chunk = await self.master.receive_some(65536)
                except trio.BrokenResourceError:  # EIO: the program exited, the tty is gone
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{text!r} never drawn; screen: {self.screen!r}")
                self.raw += chunk.decode(errors="replace")
        self._seen = found + len(text)

    async def type(self, keys: str) -> None:
        await self.master.send_all(keys.encode())

    async def rest(self) -> str:
        """Everything drawn until the program exits."""
        with trio.fail_after(WAIT_S):
            while True:
                try:
                    chunk = await self.master.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                self.raw += chunk.decode(errors="replace")
        return self.screen


@asynccontextmanager
async def at_a_terminal(
    url: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Terminal, list[Any]]]:
    """``relayd chat URL`` on a new terminal, and the terminal's modes before it started."""
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    modes = termios.tcgetattr(slave)
    env = _environment({"TERM": "xterm", "INPUTRC": "/dev/null", **(env or {})})
    try:
        proc = await trio.lowlevel.open_process(
            ["setsid", "--ctty", *MODULE, "chat", url],  # Ctrl-C on it is SIGINT to chat
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    try:
        yield Terminal(proc, stream), modes
    finally:
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                proc.kill()
            await proc.wait()
            await stream.aclose()


async def test_at_a_terminal_lines_are_edited_recalled_and_never_torn() -> None:
    async with (
        running(Server(settings())) as url,
        connect(url, v1=True) as peer,
        at_a_terminal(url) as (terminal, modes),
    ):
        await terminal.expect("connected to ")
        await terminal.expect("> ")
        await terminal.type(f"/to {peer.id}\r")
        prompt = f"to {peer.id}> "
        await terminal.expect(prompt)

        await terminal.type("hello\r")
        assert (await peer.recv_json())["message"] == "hello"
        await terminal.expect(f"ack 1\n{prompt}")  # a person types once it is there
        await terminal.type("\x1b[A\r")  # up arrow: the last line again
        assert (await peer.recv_json())["message"] == "hello"
        await terminal.expect(f"ack 2\n{prompt}")
        await terminal.type("wrld\x1b[D\x1b[D\x1b[Do\r")  # three times left, then a typo fixed
        assert (await peer.recv_json())["message"] == "world"
        await terminal.expect(f"ack 3\n{prompt}")

        await terminal.type("half a li")
        await terminal.expect("half a li")
        await peer.send(_chat_id(terminal), "an arrival while typing")
        # Drawn on a line of its own, and the prompt with the half-typed line drawn again.
        await terminal.expect(f"< {peer.id}: an arrival while typing\nto {peer.id}> half a li")
        await terminal.type("ne\r")
        assert (await peer.recv_json())["message"] == "half a line"
        await terminal.expect(f"ack 4\n{prompt}")

        await terminal.type("half typed, then Ctrl-C")
        await terminal.expect("half typed, then Ctrl-C")
        await terminal.type("\x03")
        screen = await terminal.rest()
        assert await terminal.proc.wait() == 0
        assert screen.endswith(f"to {peer.id}> half typed, then Ctrl-C\nclosed: 1000\n"), screen
        # readline's modes (no echo, no line buffering) are gone with it.
        assert termios.tcgetattr(terminal.master.fileno()) == modes


async def test_at_a_terminal_in_the_c_locale_bytes_not_utf8_are_sent_as_u_fffd() -> None:
    # In the C locale Python decodes typed bytes with surrogateescape: a byte that is not
    # UTF-8 became a lone surrogate, which stopped the chat with a traceback.
    async with (
        running(Server(settings())) as url,
        connect(url, v1=True) as peer,
        at_a_terminal(url, {"LC_ALL": "C"}) as (terminal, _),
    ):
        await terminal.expect("connected to ")
        await terminal.expect("> ")
        await terminal.master.send_all(f"{peer.id} caf".encode() + b"\xe9 ok\r")
        with trio.fail_after(WAIT_S):
            assert (await peer.recv_json())["message"] == "caf\ufffd ok"
        await terminal.expect("relayd chat: a line was not UTF-8: its bad bytes are sent as U+FFFD")
        await terminal.expect("ack 1\n> ")
        await terminal.type("/quit\r")
        assert (await terminal.rest()).endswith("closed: 1000\n")
        assert await terminal.proc.wait() == 0


async def test_sigterm_at_a_terminal_closes_with_1000_and_puts_the_modes_back() -> None:
    async with running(Server(settings())) as url, at_a_terminal(url) as (terminal, modes):
        await terminal.expect("connected to ")
        await terminal.expect("> ")  # readline is reading: its modes are on
        terminal.proc.send_signal(signal.SIGTERM)
        assert (await terminal.rest()).endswith("> \nclosed: 1000\n")
        assert await terminal.proc.wait() == 0
        assert termios.tcgetattr(terminal.master.fileno()) == modes


def _chat_id(terminal: Terminal) -> str:
    match = CONNECTED.search(terminal.screen)
    assert match is not None, terminal.screen
    return match["id"]
