"""Who a handshake's client is: its token checked, unless its address has failed too often.

:class:`Authentication` is the gate's (:class:`~relayd.daemon.gate.Gate`): it
asks the :class:`~relayd.policy.auth.Authenticator` about each handshake's
token, and counts the ones refused with 401 against their address
(:class:`~relayd.policy.failures.AuthFailures`); an address over
``max_auth_failures_per_ip`` is refused with 429 before its token is looked at.
Time is trio's clock. Nothing here raises: a refusal is an answer to send.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

import trio

from relayd.config import LimitsSettings
from relayd.policy.auth import Authenticator, Identity, token_from
from relayd.policy.failures import AuthFailures
from relayd.telemetry.metrics import Stats
from relayd.wire.handshake import Refusal, UpgradeRequest

__all__ = ["Authentication"]

_TOO_MANY_FAILURES: Final = Refusal(429, "too many failed authentications from this address")


class Authentication:
    """Handshakes' tokens, checked within the limits on failures.

    Args:
        authenticator: checks tokens and names clients; None checks nothing.
        limits: the limits on failed authentications.
        stats: counts the failures.
    """

    __slots__ = ("_failures", "_stats", "authenticator")

    def __init__(
        self, authenticator: Authenticator | None, limits: LimitsSettings, stats: Stats
    ) -> None:
        self.authenticator = authenticator
        self._failures = AuthFailures(limits.max_auth_failures_per_ip, limits.auth_failure_window_s)
        self._stats = stats

    def reconfigure(self, authenticator: Authenticator | None, limits: LimitsSettings) -> None:
        """Apply a reload: the authenticator and the limits on failures."""
        self._failures.configure(limits.max_auth_failures_per_ip, limits.auth_failure_window_s)
        self.authenticator = authenticator

    def identify(
        self, authenticator: Authenticator, ip: str, request: UpgradeRequest
    ) -> Identity | Refusal:
        """Check the request's token, unless its address has failed too often."""
        now = trio.current_time()
        failures = self._failures
        if failures.blocked(ip, now):
            return _TOO_MANY_FAILURES
        identity = authenticator.authenticate(token_from(request.headers, request.target))
        if isinstance(identity, Refusal) and identity.status == HTTPStatus.UNAUTHORIZED:
            failures.failed(ip, now)
            self._stats.auth_failures += 1
        return identity
