"""The daemon on trio: listeners, connections, the drain, signals and systemd.

The data path reads one way through it::

    accept (server) -> handshake (gate) -> reader -> intake
        -> router (relayd.routing) -> recipient's outbox -> writer -> socket

* :mod:`~relayd.daemon.server`: the composition root; start, serve, drain.
* :mod:`~relayd.daemon.listeners`: the sockets relayd listens on, bound from
  the settings, wrapped in TLS.
* :mod:`~relayd.daemon.reload`: what a reload changes, and what is in force
  after it (pure).
* :mod:`~relayd.daemon.accepting`: the public accept loops, within the
  open-file budget.
* :mod:`~relayd.daemon.gate`: accepted streams to connections: handshake,
  admission, and the connection boundary.
* :mod:`~relayd.daemon.request_head`: a handshake's request head, read within
  its time and size bounds.
* :mod:`~relayd.daemon.authentication`: a handshake's token checked, within
  the limit on failures.
* :mod:`~relayd.daemon.connection`: one connection, as the router's Peer; its
  lifecycle carried out.
* :mod:`~relayd.daemon.reader`: its socket to the router, and its timers.
* :mod:`~relayd.daemon.closing`: its end: the closing handshake and
  ``connection.close``.
* :mod:`~relayd.daemon.intake`: what each message becomes as it arrives (pure).
* :mod:`~relayd.daemon.writer`: its outbox to its socket.
* :mod:`~relayd.daemon.transport`: its stream, written to and closed gracefully.
* :mod:`~relayd.daemon.service`: the process: signals, reload, systemd.
* :mod:`~relayd.daemon.heap`: the garbage collector, set for serving.
* :mod:`~relayd.daemon.admin`: ``/metrics``, ``/healthz``, ``/readyz``.
* :mod:`~relayd.daemon.api`: the server API's routes on the admin listener.
* :mod:`~relayd.daemon.systemd`: sd_notify and socket activation.
* :mod:`~relayd.daemon.live`: the settings a reload may replace.
* :mod:`~relayd.daemon.credentials`: reading keys, tokens and certificates.
* :mod:`~relayd.daemon.addresses`: how socket addresses are written.
"""
