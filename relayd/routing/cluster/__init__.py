"""Routing across nodes: several relayd processes sharing one Redis (``[cluster]``).

Imported only when ``cluster.enabled`` is on; nothing here is loaded otherwise.

* :mod:`~relayd.routing.cluster.codec`: what nodes say to each other, and the
  channel names (pure).
* :mod:`~relayd.routing.cluster.pending`: questions awaiting other nodes'
  answers, and what their askers hear (pure).
* :mod:`~relayd.routing.cluster.backoff`: the waits between reconnections (pure).
* :mod:`~relayd.routing.cluster.link`: the broker link as the router sees it,
  and its health.
* :mod:`~relayd.routing.cluster.redis`: the link to Redis (coredis).
"""
