"""Settings a reload may replace while relayd runs.

The gate and every connection hold the same :class:`LiveLimits` and read
``current`` where they use a limit, never a copy, so a reload that assigns a
new :class:`~relayd.config.LimitsSettings` reaches them all at once:

* at the next handshake: every limit;
* on open connections, from their next message or timer: ``max_message_bytes``
  (lowered, it refuses messages with ``message_too_large``; the frame parser's
  cap, which bounds its memory, stays as the connection started),
  ``messages_per_second`` and ``message_burst`` (a fresh bucket, if they changed),
  ``idle_timeout_s``, ``ping_interval_s`` and ``pong_timeout_s``;
* never on open connections: ``outbox_messages`` and ``slow_consumer_timeout_s``
  (an outbox is sized when it is made), ``frames_per_second`` and
  ``frame_burst`` (paced as the connection started, like its parser) and the
  handshake limits.
"""

from __future__ import annotations

import dataclasses

from relayd.config import LimitsSettings

__all__ = ["LiveLimits"]


@dataclasses.dataclass(slots=True)
class LiveLimits:
    """The limits in force; assign ``current`` to change them everywhere.

    Attributes:
        current: the limits.
    """

    current: LimitsSettings
