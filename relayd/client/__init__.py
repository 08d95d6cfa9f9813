"""relayd's client side, on trio-websocket; the daemon imports none of it.

* :mod:`~relayd.client.chat`: ``relayd chat``, a terminal client.
"""
