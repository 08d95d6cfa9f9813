"""Who receives a message: the router interface, its decisions, and its implementations.

* :mod:`~relayd.routing.interface`: :class:`~relayd.routing.interface.Router`,
  the whole interface connections see, and what they hand it.
* :mod:`~relayd.routing.table`: ids to connections, and a message's outcome
  (pure).
* :mod:`~relayd.routing.outbox`: one connection's bounded queue between the
  router and its writer (pure).
* :mod:`~relayd.routing.replies`: the ack and error frames a sender hears.
* :mod:`~relayd.routing.local`: the router of one process.
* :mod:`~relayd.routing.factory`: the one place the daemon's router is chosen.
* :mod:`~relayd.routing.cluster`: what a router for several relayd processes
  sharing one Redis is built from.
"""
