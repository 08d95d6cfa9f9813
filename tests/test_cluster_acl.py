"""The Redis ACL user docs/scaling.md describes is enough for two cluster nodes.

The commands, channels and key are read from the doc's bullet itself ("The ACL
user needs the commands ..."), and so is its ready-to-paste ``ACL SETUSER``
line: the test fails as soon as the doc asks for less than relayd sends, or
names a command this Redis lacks without marking it "Redis X.Y and later".
A user is made on a real redis-server with exactly what the doc grants, then
two nodes log in as that user (``redis://relayd@...`` and ``password_file``,
built as the daemon builds them) and must come up at their first attempt,
deliver and acknowledge across nodes, answer presence and ids, tell an id
nobody holds (the publish script's cut-off check), unsubscribe, and leave
(``ZREM``), with no ``broker.*`` warning. Every wait is bounded by
``fail_after``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
import trio

from relayd.config import ClusterSettings
from relayd.routing.cluster.build import cluster_router
from relayd.routing.cluster.link import Health
from relayd.telemetry.log import get_logger
from relayd.telemetry.messages import MessageEvents
from relayd.telemetry.metrics import Stats
from tests.redis_server import RedisServer
from tests.test_cluster_router import Conn
from tests.test_cluster_router import Node as RouterNode

DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
#: How the bullet starts, and where its command list ends and its channels begin.
BULLET = "- The ACL user needs"
CHANNELS_AFTER = " on the channels "
KEY_AFTER = " and the key "
USER = "relayd"
PASSWORD = "acl-test-secret"
#: Probes (each runs the heartbeat script) every 50 ms; heartbeats stay fresh
#: longer than the test runs, so a heartbeat left behind shows.
SETTINGS: dict[str, Any] = {
    "probe_interval_s": 0.05,
    "probe_timeout_s": 1.0,
    "node_timeout_s": 60.0,
    "reconnect_max_s": 0.2,
    "connect_timeout_s": 2.0,
    "reply_timeout_s": 2.0,
}
LIMIT_S = 20.0
#: How long Redis may take to confirm an UNSUBSCRIBE (it never does if refused).
CONFIRM_S = 5.0
LogEvents = list[MutableMapping[str, Any]]


# -- what the doc grants ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of the doc's list, and what the doc says after it (in parentheses)."""

    name: str  # as the doc writes it: "CLIENT SETINFO"
    note: str  # "Redis 7.2 and later only; ...", or ""

    @property
    def acl(self) -> str:
        """Its name in an ACL rule: ``client|setinfo``."""
        return "|".join(self.name.lower().split())

    @property
    def since(self) -> str | None:
        """The Redis version the doc says it needs ("7.2"), if it says one."""
        found = re.search(r"Redis (\d+(?:\.\d+)*) and later", self.note)
        return found.group(1) if found else None


@dataclasses.dataclass(frozen=True)
class Grants:
    """What docs/scaling.md's ACL bullet says the user needs."""

    commands: list[Command]
    channels: list[str]
    keys: list[str]
    setuser: str | None  # the ready-to-paste line, if the bullet has one


def acl_bullet() -> str:
    """The ACL bullet of docs/scaling.md: its first line and its indented continuation."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    starts = [number for number, line in enumerate(lines) if line.startswith(BULLET)]
    assert len(starts) == 1, f"docs/scaling.md has no single bullet starting {BULLET!r}"
    bullet = [lines[starts[0]]]
    for line in lines[starts[0] + 1 :]:
        if line and not line.startswith("  "):
            break
        bullet.append(line)
    return "\n".join(bullet).strip()


def quoted(text: str) -> list[str]:
    """The `backquoted` spans of ``text``, whitespace made single spaces."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]


def documented() -> Grants:
    """The commands, channels, key and ``ACL SETUSER`` line the doc's bullet gives."""
    bullet = acl_bullet()
    setuser = re.search(r"^\s*(ACL SETUSER .+?)\s*$", bullet, re.MULTILINE)
    prose = " ".join(bullet.split())
    listed, found, rest = prose.removeprefix(BULLET).partition(CHANNELS_AFTER)
    assert found, f"the ACL bullet names no channels ({CHANNELS_AFTER.strip()!r}):\n{bullet}"
    channels, found, rest = rest.partition(KEY_AFTER)
    assert found, f"the ACL bullet names no key ({KEY_AFTER.strip()!r}):\n{bullet}"
    # Each command with what follows it up to the next one: its note, if any.
    spans = list(re.finditer(r"`([^`]+)`", listed))
    commands = []
    for span, after in itertools.zip_longest(spans, spans[1:]):
        gap = listed[span.end() : after.start() if after else len(listed)]
        note = re.match(r"\s*\(([^)]*)\)", gap)
        commands.append(Command(" ".join(span.group(1).split()), note.group(1) if note else ""))
    return Grants(
        commands=commands,
        channels=quoted(channels),
        keys=quoted(rest)[:1],
        setuser=setuser.group(1) if setuser else None,
    )


def acl_setuser(redis: RedisServer, *rules: str) -> None:
    """Run ``ACL SETUSER`` with ``rules`` on ``redis``; it must answer OK."""
    answer = redis.cli("ACL", "SETUSER", *rules)
    assert answer == "OK", f"ACL SETUSER {' '.join(rules)}\n-> {answer}"


def has_command(redis: RedisServer, acl_name: str) -> bool:
    """Whether ``redis`` knows the command (``COMMAND INFO`` answers nil for one it lacks)."""
    return bool(redis.cli("COMMAND", "INFO", acl_name))


def user_from_the_list(redis: RedisServer, grants: Grants) -> None:
    """Make the user with exactly the doc's commands, channels and key.

    A command the doc marks as needing a newer Redis than this one is left
    out; any other this Redis lacks makes ``ACL SETUSER`` fail, as it would
    for an operator.
    """
    assert grants.commands, "the ACL bullet lists no commands"
    assert grants.channels, "the ACL bullet names no channel pattern"
    assert grants.keys, "the ACL bullet names no key"
    granted = [
        f"+{command.acl}"
        for command in grants.commands
        if command.since is None or has_command(redis, command.acl)
    ]
    acl_setuser(
        redis,
        USER,
        "on",
        f">{PASSWORD}",
        "resetchannels",
        *(f"&{channel}" for channel in grants.channels),
        "resetkeys",
        *(f"~{key}" for key in grants.keys),
        "-@all",
        *granted,
    )


def user_from_the_line(redis: RedisServer, grants: Grants) -> None:
    """Make the user with the doc's ``ACL SETUSER`` line, its password filled in."""
    assert grants.setuser is not None, "the ACL bullet has no ACL SETUSER line"
    name, *rules = grants.setuser.split()[2:]
    assert name == USER, f"the line makes the user {name!r}, the test logs in as {USER!r}"
    assert ">PASSWORD" in rules, "the line has no >PASSWORD to fill in"
    acl_setuser(redis, name, *(f">{PASSWORD}" if rule == ">PASSWORD" else rule for rule in rules))


def password_file(directory: Path) -> Path:
    """The file ``password_file`` names, as an operator writes it (newline at the end)."""
    path = directory / "redis-password"
    path.write_text(f"{PASSWORD}\n", encoding="utf-8")
    return path


# -- two nodes -------------------------------------------------------------------------


class Node(RouterNode):
    """A cluster node's router, running, with a handle on its real link."""

    @property
    def health(self) -> Health:
        return self.link.health

    async def wait_for_subscriptions(self, count: int) -> None:
        await self.link.wait_for(lambda health: health.subscriptions == count)

    async def error_to(self, sender: Conn, to: str, ref: str) -> str:
        """Send to ``to``; the error the sender hears."""
        await self.send(sender, to, "anyone?", ref)
        [reply] = await sender.frames()
        assert (reply["type"], reply["ref"]) == ("error", ref), reply
        error: str = reply["error"]
        return error


def broker_trouble(logs: LogEvents) -> list[str]:
    """The ``broker.*`` warnings and link errors logged, with their reasons."""
    return [
        f"{event['event']}: {event.get('reason', event.get('summary'))}"
        for event in logs
        if event["event"] in ("broker.unreachable", "broker.lost", "error")
    ]


@asynccontextmanager
async def node(url: str, password: Path, name: str, logs: LogEvents) -> AsyncIterator[Node]:
    """A node built as the daemon builds it; yields once its first attempt is over."""
    settings = ClusterSettings(
        enabled=True, broker_url=url, password_file=str(password), node_name=name, **SETTINGS
    )
    stats = Stats()
    router = cluster_router(
        settings, MessageEvents(get_logger(), stats), stats, shared_ids=lambda: False
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)  # returns once the first attempt is over
        running = Node(router)
        assert running.health.up, f"{name} did not come up: {broker_trouble(logs)}"
        assert running.health.failed_attempts == 0, broker_trouble(logs)
        yield running
        router.close()


async def two_nodes_work(redis: RedisServer, db: int, password: Path) -> None:
    """Two nodes logged in as the ACL user, on database ``db``, do all a node asks Redis for."""
    url = f"redis://{USER}@127.0.0.1:{redis.port}/{db}"
    with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
        async with node(url, password, "n1", logs) as one:
            alice = await one.connect(Conn("alice"))
            async with node(url, password, "n2", logs) as two:
                bob = await two.connect(Conn("bob"))
                # A message across, delivered and acked (the ack is an answer
                # published with CLIENT REPLY SKIP), both ways.
                await one.send(alice, "bob", {"text": "hello"}, ref="m1")
                assert await bob.frames() == [
                    {"type": "message", "from": "alice", "message": {"text": "hello"}}
                ]
                assert await alice.frames() == [{"type": "ack", "ref": "m1"}]
                await two.send(bob, "alice", "hi back", ref="b1")
                assert await alice.frames() == [
                    {"type": "message", "from": "bob", "message": "hi back"}
                ]
                assert await bob.frames() == [{"type": "ack", "ref": "b1"}]
                # Presence and ids across nodes.
                assert await one.router.presence("bob") == 1
                assert await two.router.presence("alice") == 1
                assert await one.router.presence("nobody") == 0
                assert await two.router.list_ids(after=None, limit=10) == ["alice", "bob"]
                # An id nobody holds: the publish script's cut-off check runs
                # (TIME, ZCOUNT, PUBSUB NUMSUB) and finds every node listening.
                assert await one.error_to(alice, "nobody", ref="m2") == "unknown_recipient"
                # UNSUBSCRIBE: bob's id is nobody's once Redis confirms it.
                subscriptions = two.health.subscriptions
                two.router.unregister(bob)
                with trio.move_on_after(CONFIRM_S):
                    await two.wait_for_subscriptions(subscriptions - 1)
                assert two.health.subscriptions == subscriptions - 1, "UNSUBSCRIBE unconfirmed"
                assert await one.error_to(alice, "bob", ref="m3") == "unknown_recipient"
                await two.connect(Conn("bob"))
            # n2 left: its heartbeat is removed (ZREM), so its ids are unknown at
            # once, not unreachable (a fresh heartbeat of a node no longer
            # listening), once Redis has dropped n2's connections.
            redis.forget_clients("relayd:n2:")
            assert await one.error_to(alice, "bob", ref="m4") == "unknown_recipient"
            assert one.health.up
    assert not broker_trouble(logs)
    assert redis.cli("-n", str(db), "ZRANGE", "relayd:heartbeats", "0", "-1") == ""  # both left


# -- the tests -------------------------------------------------------------------------


def test_the_setuser_line_grants_what_the_list_names() -> None:
    """The line grants every command the list names without a condition, and no other."""
    grants = documented()
    assert grants.setuser is not None, "the ACL bullet has no ACL SETUSER line"
    rules = grants.setuser.split()
    granted = {rule[1:] for rule in rules if rule.startswith("+")}
    listed = {command.acl for command in grants.commands}
    unconditional = {command.acl for command in grants.commands if not command.note}
    assert granted <= listed, f"not in the list: {sorted(granted - listed)}"
    assert unconditional <= granted, f"not in the line: {sorted(unconditional - granted)}"
    assert rules[:4] == ["ACL", "SETUSER", USER, "on"]
    assert "-@all" in rules
    assert {f"&{channel}" for channel in grants.channels} <= set(rules)
    assert {f"~{key}" for key in grants.keys} <= set(rules)


async def test_two_nodes_work_as_a_user_with_the_documented_commands(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Exactly the listed commands, on database 1 (so SELECT is needed too)."""
    user_from_the_list(redis_server, documented())
    await two_nodes_work(redis_server, 1, password_file(tmp_path))


async def test_two_nodes_work_as_the_user_the_documented_line_makes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The ready-to-paste ``ACL SETUSER`` line, on database 0."""
    user_from_the_line(redis_server, documented())
    await two_nodes_work(redis_server, 0, password_file(tmp_path))
