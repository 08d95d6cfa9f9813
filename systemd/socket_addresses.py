"""Whether relayd.socket listens where the nodes of ``install.sh --nodes`` would bind.

The nodes bind ``[server]`` host and port from relayd.toml themselves; a single daemon
serves wherever relayd.socket listens, which a ``ListenStream=`` drop-in may have moved
(another port, loopback behind a proxy). ``install.sh --nodes`` runs this with the
installed venv's Python before it stops relayd.socket, with two arguments, the
``Listen`` and ``BindIPv6Only`` properties of relayd.socket as ``systemctl show --value``
prints them, and ``relayd check-config``'s output (the effective settings) on stdin.
Exit status 0 when both sides are the same set of addresses; 1, with both sets on
stderr, when they differ; 2 when the input cannot be read. Addresses are compared, not
their spellings: relayd.socket's dual-stack ``[::]:9030`` is ``0.0.0.0:9030`` and
``[::]:9030``, which is what relayd binds for host ``""``; a host name is resolved as
relayd resolves it.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys

Address = tuple[str, int]


def _ipv6() -> bool:
    """Whether this kernel can make IPv6 sockets (relayd skips the family when not)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _address(host: str, port: int) -> Address:
    return ipaddress.ip_address(host).compressed, port


def socket_side(listen: str, bind_ipv6_only: str) -> set[Address]:
    """The addresses of relayd.socket's stream sockets, from ``systemctl show``.

    ``listen`` has one ``ADDRESS (Stream)`` line per socket; a socket on ``[::]`` that
    is not ``ipv6-only`` takes IPv4 clients too (``BindIPv6Only=both``, or ``default``
    with the kernel's default ``net.ipv6.bindv6only = 0``).

    Raises:
        ValueError: a line that is not a stream socket's address.
    """
    addresses = set()
    for line in listen.splitlines():
        if not line.strip():
            continue
        where, kind = line.strip().rsplit(" ", 1)
        if kind != "(Stream)":
            raise ValueError(f"not a stream socket: {line!r}")
        host, _, port_text = where.rpartition(":")
        host, port = host.removeprefix("[").removesuffix("]"), int(port_text)
        addresses.add(_address(host, port))
        if host == "::" and bind_ipv6_only != "ipv6-only":
            addresses.add(_address("0.0.0.0", port))
    return addresses


def relayd_side(host: str, port: int, *, ipv6: bool) -> set[Address]:
    """What relayd binds for ``[server]`` host and port (``listeners.bind``'s addresses).

    Raises:
        OSError: the host does not resolve.
    """
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return {
        _address(str(sockaddr[0]).partition("%")[0], port)
        for family, _, _, _, sockaddr in found
        if family == socket.AF_INET or (family == socket.AF_INET6 and ipv6)
    }


def _shown(addresses: set[Address]) -> str:
    return ", ".join(
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in sorted(addresses)
    )


def main(argv: list[str]) -> int:
    """Compare; see the module's docstring."""
    try:
        listen, bind_ipv6_only = argv
        server = json.load(sys.stdin)["server"]
        theirs = socket_side(listen, bind_ipv6_only)
        ours = relayd_side(server["host"], server["port"], ipv6=_ipv6())
    except (ValueError, KeyError, TypeError, OSError) as exc:
        print(f"cannot compare relayd.socket with [server]: {exc!r}", file=sys.stderr)
        return 2
    if theirs == ours:
        return 0
    print(
        f"relayd.socket listens on {_shown(theirs)}, but the nodes would bind {_shown(ours)}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
