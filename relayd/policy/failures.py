"""Failed authentications by client address, without I/O: guessing tokens is refused.

With authentication on, every handshake whose token is refused with 401 (no
token, a wrong or expired one) takes a token from its address's bucket:
``max_auth_failures_per_ip`` of them, refilled evenly over
``auth_failure_window_s``. An address whose bucket is empty is refused with
429 before its token is looked at, until the bucket has refilled enough for
one more try: a guesser gets ``max_auth_failures_per_ip`` tries at once and
then one every ``auth_failure_window_s / max_auth_failures_per_ip`` seconds
(6 s at the defaults), whatever it sends. Clients with good tokens never
touch their bucket.

Memory: at most :data:`MAX_ADDRESSES` addresses are tracked, each a bucket of
a few dozen bytes; when more fail, the one that failed least recently is
forgotten first, and an address whose bucket has refilled is forgotten when
it is next looked at.

Time is passed in (trio's clock in the daemon, plain floats in tests).
"""

from __future__ import annotations

from typing import Final

from relayd.policy.ratelimit import TokenBucket

__all__ = ["MAX_ADDRESSES", "AuthFailures"]

#: Addresses whose failures are remembered at once. An attacker with more
#: addresses than this gets around any per-address limit anyway.
MAX_ADDRESSES: Final = 4096


class AuthFailures:
    """The failed authentications of each client address.

    Args:
        limit: failures an address may make at once; 0 turns the check off.
        window_s: seconds over which an address's budget refills completely.
    """

    __slots__ = ("_buckets", "_limit", "_rate")

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._rate = limit / window_s
        self._buckets: dict[str, TokenBucket] = {}  # least recently failed first

    def configure(self, limit: int, window_s: float) -> None:
        """Apply new limits; what was remembered is forgotten if they changed."""
        if (limit, limit / window_s) != (self._limit, self._rate):
            self._limit, self._rate = limit, limit / window_s
            self._buckets.clear()

    def blocked(self, ip: str, now: float) -> bool:
        """Whether ``ip`` has failed too often to be let try again at ``now``."""
        bucket = self._buckets.get(ip)
        if bucket is None:
            return False
        tokens = bucket.available(now)
        if tokens >= self._limit:  # refilled: nothing left to remember
            del self._buckets[ip]
        return tokens < 1

    def failed(self, ip: str, now: float) -> None:
        """Count one failed authentication from ``ip`` at ``now``."""
        if not self._limit:
            return
        bucket = self._buckets.pop(ip, None)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._limit, now)
            if len(self._buckets) >= MAX_ADDRESSES:
                del self._buckets[next(iter(self._buckets))]
        bucket.take(now)
        self._buckets[ip] = bucket  # now the most recent

    def __len__(self) -> int:
        """Addresses remembered now."""
        return len(self._buckets)
