"""``relayd chat``'s session in-process, on trio's virtual clock: its pacing under a rate limit.

tests/test_chat.py runs the real command as a child process, on the wall clock; the
waits of a session over relayd's rate limit are seconds to minutes long, so they are
tested here, against an in-process relayd, with :class:`trio.testing.MockClock`
jumping over them.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import trio
import trio.testing

from relayd.client import connect
from relayd.client.chat_session import Session
from relayd.client.terminal import Console
from relayd.daemon import intake as intake_module
from relayd.daemon.server import Server
from relayd.routing.replies import error_frame
from tests.client import running, settings
from tests.test_client import relay


class ScriptedConsole(Console):
    """A console that types ``lines``, then ends the input; it keeps what is printed."""

    def __init__(self, lines: list[str]) -> None:  # no terminal: Console's own is not run
        self.interactive = False
        self._lines = list(lines)
        self.said: list[str] = []
        self.warned: list[str] = []
        self.has_warned = trio.Event()

    async def readline(self, prompt: str) -> str | None:
        return self._lines.pop(0) if self._lines else None

    def say(self, line: str) -> None:
        self.said.append(line)

    def warn(self, line: str) -> None:
        self.warned.append(line)
        self.has_warned.set()


async def test_a_burst_is_paced_to_a_rate_below_one_a_second_without_a_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # relayd announces its rate at the handshake; the chat waits for the token that
    # rate refills. It waited 1 s after a refusal whatever the rate: at 0.5 a second,
    # the message sent again was refused once more with relayd's second bucket empty,
    # and the connection closed with 1008, the lines after it lost.
    async with (
        relay(messages_per_second=0.5, message_burst=1) as url,
        connect(url) as peer,
        connect(url) as client,
    ):
        lines = [f"{peer.id} line {n}" for n in range(4)]
        console = ScriptedConsole(lines)
        start = trio.current_time()
        assert await Session(client, console, "help").run()
        assert client.closed is None  # still open: the person quit
        assert console.said == ["ack 1", "ack 2", "ack 3", "ack 4"]
        assert console.warned == [
            "over the server's rate limit: a message it refuses is sent again after the wait"
            " it asks for (2.02 s)"
        ]
        assert [(await peer.receive()).data for _ in lines] == [f"line {n}" for n in range(4)]
        # One message every 2 s after the first, as relayd's retry_after_ms says (2002 ms),
        # a hundredth more for the clocks: without it, the chat waited 1.1 intervals of
        # the rate relayd announced (2.2 s).
        assert trio.current_time() - start < 3 * 2.002 * 1.01 + 0.05


@pytest.fixture(params=["told", "older relayd"])
def told(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether relayd says how long to wait (``retry_after_ms``); an older relayd did not."""
    if request.param == "told":
        return True

    def without_the_wait(*args: Any) -> bytes:
        return error_frame(*args[:5])

    monkeypatch.setattr(intake_module, "error_frame", without_the_wait)
    return False


async def test_a_rate_a_reload_lowered_below_the_announced_one_is_waited_out_too(
    autojump_clock: trio.testing.MockClock, told: bool
) -> None:
    # The announced rate is the one at connect. relayd says how long to wait at the
    # rate in force. An older relayd did not: a message refused again after its
    # interval shows that a reload lowered it, and the waits go back to a second at
    # least, rather than going on from a few milliseconds, each refusal taking a token
    # from relayd's second bucket until the 1008.
    server = Server(settings())
    async with running(server) as url, connect(url) as peer, connect(url) as client:
        assert client.messages_per_second == 50.0
        server.reload(settings(messages_per_second=2.0, message_burst=3), None)
        lines = [f"{peer.id} line {n}" for n in range(6)]
        console = ScriptedConsole(lines)
        start = trio.current_time()
        assert await Session(client, console, "help").run()
        assert console.said == [f"ack {n}" for n in range(1, 7)]
        assert [(await peer.receive()).data for _ in lines] == [f"line {n}" for n in range(6)]
        if told:
            # Each line past the new burst refused once, and sent again when relayd had
            # room for it: the wait it asks for is the new rate's half second. Untold,
            # the first was refused again after the announced rate's 22 ms, and the
            # lines after it waited a second each.
            assert server.stats.messages["rate_limited"] == 3
            assert trio.current_time() - start < 3 * 0.502 * 1.01 + 0.05


@pytest.mark.parametrize(
    ("rate", "burst", "count"),
    [
        # Each line was refused twice (on arrival, and again after the announced rate's
        # 22 ms) before its 1 s wait: at 1 a second and a burst of 3, relayd's second
        # bucket ran dry at the sixth line (1008), the lines after it lost. The wait
        # reached is kept for the lines after: one refusal a line, one a second.
        (1.0, 3, 12),
        # The waits stopped doubling at 30 s: at 0.01 a second each line was refused
        # every 30 s until relayd's bucket held a token (100 s), more refusals than its
        # second bucket refills, and the 1008 came at the third line past the burst.
        (0.01, 12, 16),
    ],
)
async def test_a_rate_a_reload_lowered_is_learned_for_the_lines_after_too(
    autojump_clock: trio.testing.MockClock, rate: float, burst: int, count: int, told: bool
) -> None:
    server = Server(settings())
    async with running(server) as url, connect(url) as peer, connect(url) as client:
        server.reload(settings(messages_per_second=rate, message_burst=burst), None)
        lines = [f"{peer.id} line {n}" for n in range(count)]
        console = ScriptedConsole(lines)
        assert await Session(client, console, "help").run()
        assert client.closed is None
        assert console.said == [f"ack {n}" for n in range(1, count + 1)]
        expected = [f"line {n}" for n in range(count)]
        assert [(await peer.receive()).data for _ in lines] == expected
        if told:  # once a line past the burst
            assert server.stats.messages["rate_limited"] == count - burst


async def test_a_rate_a_reload_lowered_to_a_burst_of_one_ends_in_no_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # relayd's second bucket holds one refusal: a line refused twice within ten seconds
    # closes the connection. Sent again after the announced rate's 22 ms, as the chat
    # does when relayd does not say how long to wait (the `told` fixture's older relayd),
    # the second line was, and the chat ended in a 1008.
    server = Server(settings())
    async with running(server) as url, connect(url) as peer, connect(url) as client:
        server.reload(settings(messages_per_second=0.1, message_burst=1), None)
        lines = [f"{peer.id} line {n}" for n in range(3)]
        console = ScriptedConsole(lines)
        assert await Session(client, console, "help").run()
        assert client.closed is None
        assert console.said == ["ack 1", "ack 2", "ack 3"]
        assert server.stats.messages["rate_limited"] == 2


async def test_a_line_typed_after_a_pause_then_lines_at_once_end_in_no_1008_at_a_burst_of_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # At 1 a second with a burst of 1: line A, line B 0.6 s later (refused: A took the
    # token), C and D at once. B's wait was its token's alone, 0.4 s: C, sent as B went
    # through, was refused before relayd's abuse bucket had its token back, the 1008.
    class PausingConsole(ScriptedConsole):
        async def readline(self, prompt: str) -> str | None:
            if len(self._lines) == 3:  # before B
                await trio.sleep(0.6)
            return await super().readline(prompt)

    async with (
        relay(messages_per_second=1.0, message_burst=1) as url,
        connect(url) as peer,
        connect(url) as client,
    ):
        console = PausingConsole([f"{peer.id} {line}" for line in "ABCD"])
        assert await Session(client, console, "help").run()
        assert client.closed is None
        assert console.said == ["ack 1", "ack 2", "ack 3", "ack 4"]
        assert [(await peer.receive()).data for _ in range(4)] == list("ABCD")


async def test_a_much_longer_wait_after_a_reload_is_said_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The chat said once that it waits, at the first refusal (a tenth of a second, not
    # named); a reload then lowered the rate to one message in 100 s, and the lines sat
    # unsent for minutes without a word.
    server = Server(settings(messages_per_second=10.0, message_burst=1))

    class ReloadingConsole(ScriptedConsole):
        async def readline(self, prompt: str) -> str | None:
            if len(self._lines) == 2:  # before the third line (its bucket is a full one)
                server.reload(settings(messages_per_second=0.01, message_burst=1), None)
            return await super().readline(prompt)

    async with running(server) as url, connect(url) as peer, connect(url) as client:
        console = ReloadingConsole([f"{peer.id} line {n}" for n in range(4)])
        assert await Session(client, console, "help").run()
        assert console.said == ["ack 1", "ack 2", "ack 3", "ack 4"]
        assert console.warned == [
            "over the server's rate limit: a message it refuses is sent again after the wait"
            " it asks for",
            "over the server's rate limit: a message it refuses is sent again after the wait"
            " it asks for (101 s)",
        ]


async def test_a_burst_in_the_seed_dialect_goes_out_at_the_rate_not_into_a_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The seed dialect has no acks: a message relayd refuses is lost (its error arrives
    # as a message), and one more than twice the burst at once closed the connection.
    # Paced at the rate relayd announced, none is refused.
    async with (
        relay(messages_per_second=2.0, message_burst=2) as url,
        connect(url) as peer,
        connect(url, dialect="seed") as client,
    ):
        lines = [f"{peer.id} line {n}" for n in range(8)]
        console = ScriptedConsole(lines)
        assert await Session(client, console, "help").run()
        assert client.closed is None
        received = [(await peer.receive()).data for _ in lines]
        assert received == [f"line {n}" for n in range(8)]
        assert console.said == []  # no "! rate_limited" line
        assert console.warned == [
            "at the server's rate limit (2 messages a second): lines wait their turn"
        ]


async def test_seed_lines_within_the_burst_go_at_once_at_a_low_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # They were spaced 1.1 / rate apart from the second on (5.5 s a line at 0.2 a
    # second), the prompt held meanwhile, though relayd takes message_burst at once.
    async with (
        relay(messages_per_second=0.2, message_burst=20) as url,
        connect(url) as peer,
        connect(url, dialect="seed") as client,
    ):
        assert client.message_burst == 20
        lines = [f"{peer.id} line {n}" for n in range(5)]
        console = ScriptedConsole(lines)
        start = trio.current_time()
        assert await Session(client, console, "help").run()
        assert trio.current_time() - start < 0.5
        assert [(await peer.receive()).data for _ in lines] == [f"line {n}" for n in range(5)]
        assert console.said == console.warned == []


class TypingConsole(ScriptedConsole):
    """A scripted console whose lines come a tenth of a second apart: a quick typist."""

    async def readline(self, prompt: str) -> str | None:
        await trio.sleep(0.1)
        return await super().readline(prompt)


async def test_seed_lines_slow_down_once_refused_after_a_reload_lowered_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Paced at the rate announced at connect (50 a second), lines typed 10 a second
    # after a reload to 1 a second were refused one after another, until the 1008.
    # The first refusal slows the chat to a line a second at most; that one line is
    # lost (the seed dialect cannot send it again), and said so.
    server = Server(settings())
    async with (
        running(server) as url,
        connect(url) as peer,
        connect(url, dialect="seed") as client,
    ):
        server.reload(settings(messages_per_second=1.0, message_burst=3), None)
        lines = [f"{peer.id} line {n}" for n in range(10)]
        console = TypingConsole(lines)
        assert await Session(client, console, "help").run()
        assert client.closed is None
        received = [(await peer.receive()).data for _ in range(9)]
        assert received == [f"line {n}" for n in range(10) if n != 3]
        assert console.said == ["! rate_limited: too many messages; slow down"]
        assert console.warned[0].startswith("a line was refused as over the server's rate")


async def test_seed_errors_a_peer_forges_do_not_slow_the_chat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # In the seed dialect a peer's message of an error's shape reads as relayd's error.
    # One rate_limited error at most per line sent slows the chat: forged ones, sent
    # before any line, doubled its wait each (5 of them: 32 s a line).
    async with (
        relay() as url,
        connect(url) as peer,
        connect(url, dialect="seed") as client,
    ):
        for _ in range(5):
            await peer.send(client.id, {"error": "rate_limited", "detail": "forged"})
        await trio.testing.wait_all_tasks_blocked()
        lines = [f"{peer.id} line {n}" for n in range(4)]
        console = TypingConsole(lines)
        start = trio.current_time()
        assert await Session(client, console, "help").run()
        assert trio.current_time() - start < 1
        assert console.warned == []
        assert [(await peer.receive()).data for _ in lines] == [f"line {n}" for n in range(4)]


async def test_a_ctrl_c_while_a_line_waits_for_the_rate_names_it_not_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # tests/test_chat.py does this with the real command and a real Ctrl-C, which must
    # come within the wait; here the Ctrl-C comes once the chat has said it waits.
    async with (
        relay(messages_per_second=0.001, message_burst=1) as url,
        connect(url) as peer,
        connect(url) as client,
    ):
        console = ScriptedConsole([f"{peer.id} sent", f"{peer.id} held back"])

        async def interrupt() -> None:
            await console.has_warned.wait()  # refused, and waiting to go again
            os.kill(os.getpid(), signal.SIGINT)  # the session's signal receiver takes it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt)
            assert await Session(client, console, "help").run()
        assert client.closed is None
        assert console.said == ["ack 1"]
        assert console.warned == [
            "over the server's rate limit: a message it refuses is sent again after the wait"
            " it asks for (1.01e+03 s)",
            f"message 2 to {peer.id}: not sent (refused as over the server's rate limit, and"
            " not sent again before the end)",
        ]
        assert (await peer.receive()).data == "sent"
