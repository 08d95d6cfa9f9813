"""Routing across nodes: several relayd processes sharing one Redis (``[cluster]``).

Imported only when ``cluster.enabled`` is on; nothing here is loaded otherwise.

* :mod:`~relayd.routing.cluster.build`: the cluster router from the settings.
* :mod:`~relayd.routing.cluster.router`: the router of a node: its own
  connections first, the others through the broker.
* :mod:`~relayd.routing.cluster.awaited`: what senders are owed while other
  nodes answer: replies in order, outcomes, deadlines.
* :mod:`~relayd.routing.cluster.queries`: the server API's questions to every
  node (presence, disconnect, ids).
* :mod:`~relayd.routing.cluster.holder`: what arrives for ids held here,
  acted on and answered.
* :mod:`~relayd.routing.cluster.codec`: what nodes say to each other, and the
  channel names (pure).
* :mod:`~relayd.routing.cluster.pending`: questions awaiting other nodes'
  answers, and what their askers hear (pure).
* :mod:`~relayd.routing.cluster.backoff`: the waits between reconnections (pure).
* :mod:`~relayd.routing.cluster.link`: the broker link as the router sees it,
  and its health.
* :mod:`~relayd.routing.cluster.metrics`: the link's health as ``relayd_cluster_*``.
* :mod:`~relayd.routing.cluster.redis`: the link to Redis: sessions,
  reconnection; its parts, on coredis: ``redis_connection`` (the connections),
  ``redis_wire`` (commands written, replies taken), ``redis_publisher``,
  ``redis_subscriber``, ``redis_probe`` (the probe and the heartbeats).
"""
