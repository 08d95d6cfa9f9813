"""The daemon on trio: listeners, connections, the drain, signals and systemd.

The data path reads one way through it::

    accept (server) -> handshake (gate) -> reader (connection)
        -> router (relayd.routing) -> recipient's outbox -> writer (connection) -> socket

* :mod:`~relayd.daemon.server`: the composition root; start, serve, drain.
* :mod:`~relayd.daemon.gate`: accepted streams to connections: handshake,
  admission, authentication, and the connection boundary.
* :mod:`~relayd.daemon.connection`: one connection's reader, writer and timers.
* :mod:`~relayd.daemon.transport`: its stream, written to and closed gracefully.
* :mod:`~relayd.daemon.service`: the process: signals, reload, systemd.
* :mod:`~relayd.daemon.admin`: ``/metrics``, ``/healthz``, ``/readyz``.
* :mod:`~relayd.daemon.systemd`: sd_notify and socket activation.
* :mod:`~relayd.daemon.live`: the settings a reload may replace.
* :mod:`~relayd.daemon.credentials`: reading keys, tokens and certificates.
"""
