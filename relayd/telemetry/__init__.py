"""What relayd tells its operator: JSON log events and Prometheus metrics.

* :mod:`~relayd.telemetry.log`: structlog set-up, one event per line.
* :mod:`~relayd.telemetry.line_sink`: where the lines go: written, held in a
  batch, or dropped and counted when nobody reads them.
* :mod:`~relayd.telemetry.console`: the console format's escaping of what a
  client chose.
* :mod:`~relayd.telemetry.messages`: every message's outcome, counted and
  logged in one place.
* :mod:`~relayd.telemetry.metrics`: counters kept as plain ints on the hot
  path, turned into metric families when scraped.
"""
