"""``flower-supernode`` with a short idle poll: ``python -m flops.runtime.fast_supernode [supernode args]``.

Flower 1.42's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink returns no message
(and 0.5 s between checks for a ClientApp reply); neither is configurable. Each training and
evaluation message therefore waits 1.5 s on average before it is even seen. This launcher runs
the stock SuperNode CLI with those sleeps capped at ``FLOPS_SUPERNODE_POLL_INTERVAL`` seconds
(default 0.1) by giving its main-loop module a ``time`` whose ``sleep`` is capped. Everything
else is Flower's code, unchanged; the cost is one cheap pull request per interval.
"""

from __future__ import annotations

import os
import sys
import time
import types

POLL_ENV = "FLOPS_SUPERNODE_POLL_INTERVAL"
DEFAULT_POLL = 0.1


def capped_time(limit: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never exceeds ``limit`` seconds."""
    namespace = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    namespace.sleep = lambda seconds: time.sleep(min(seconds, limit))
    return namespace


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    limit = float(os.environ.get(POLL_ENV, DEFAULT_POLL))
    start_client_internal.time = capped_time(limit)  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
