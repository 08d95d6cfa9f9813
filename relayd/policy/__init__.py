"""Decisions about who may connect and how much they may send, without I/O.

* :mod:`~relayd.policy.admission`: accept a handshake or refuse it with a
  status (capacity, origin, subprotocol).
* :mod:`~relayd.policy.auth`: bearer tokens and JWTs to identities.
* :mod:`~relayd.policy.ratelimit`: token buckets per connection, for
  messages and for frames.
* :mod:`~relayd.policy.timers`: a connection's keepalive, idle and
  slow-consumer deadlines.

Time is passed in; nothing here imports trio.
"""
