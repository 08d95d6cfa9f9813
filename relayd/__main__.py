"""``python -m relayd``: the same as the ``relayd`` command."""

from relayd.cli import main

raise SystemExit(main())
