"""Environments relayd meets in real deployments, for the tests that start it in them."""

from __future__ import annotations

from typing import Final

#: What Kubernetes puts in every pod's environment when a Service is named ``relayd``
#: (its "service links"), here for a Service at 10.0.0.1 with port 9030.
KUBERNETES_SERVICE_LINKS: Final = {
    "RELAYD_PORT": "tcp://10.0.0.1:9030",
    "RELAYD_PORT_9030_TCP": "tcp://10.0.0.1:9030",
    "RELAYD_PORT_9030_TCP_ADDR": "10.0.0.1",
    "RELAYD_PORT_9030_TCP_PORT": "9030",
    "RELAYD_PORT_9030_TCP_PROTO": "tcp",
    "RELAYD_SERVICE_HOST": "10.0.0.1",
    "RELAYD_SERVICE_PORT": "9030",
}
